"""The task registry: names map to ``module:Class`` strings, imported only when a task is asked for."""

from __future__ import annotations

from typing import Any

from evalctx.registry import load_registered
from evalctx.tasks.base import Task

TASKS: dict[str, str] = {
    "passkey": "evalctx.tasks.passkey:PasskeyTask",
    "niah_single": "evalctx.tasks.niah:NiahSingle",
    "niah_multikey": "evalctx.tasks.niah:NiahMultikey",
    "niah_multivalue": "evalctx.tasks.niah:NiahMultivalue",
    "niah_multiquery": "evalctx.tasks.niah:NiahMultiquery",
    "kv_retrieval": "evalctx.tasks.kv_retrieval:KvRetrievalTask",
}


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``; an unknown name lists the known ones."""
    return load_registered(TASKS, name, "task")


def list_tasks() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered task, sorted by name."""
    return [(name, get_task(name).description) for name in sorted(TASKS)]


def task_defaults(name: str) -> dict[str, Any]:
    """The options a task accepts in ``[tasks.options]``, each with its default (None: unset)."""
    return dict(getattr(get_task(name), "defaults", {}))


__all__ = ["TASKS", "Task", "get_task", "list_tasks", "task_defaults"]
