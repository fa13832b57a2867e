"""The task registry: names map to ``module:Class`` strings, imported only when a task is asked for."""

from __future__ import annotations

import importlib

from evalctx.errors import UsageError
from evalctx.tasks.base import Task

TASKS: dict[str, str] = {
    "passkey": "evalctx.tasks.passkey:PasskeyTask",
    "niah_single": "evalctx.tasks.niah:NiahSingle",
    "niah_multikey": "evalctx.tasks.niah:NiahMultikey",
    "niah_multivalue": "evalctx.tasks.niah:NiahMultivalue",
    "niah_multiquery": "evalctx.tasks.niah:NiahMultiquery",
}


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``; an unknown name lists the known ones."""
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def list_tasks() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered task, sorted by name."""
    return [(name, get_task(name).description) for name in sorted(TASKS)]


__all__ = ["TASKS", "Task", "get_task", "list_tasks"]
