"""Name -> ``module:Class`` registries, imported only when a name is asked for (so `import evalctx` stays light)."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from evalctx.errors import UsageError


def load_registered(registry: Mapping[str, str], name: str, kind: str) -> Any:
    """The object registered as ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in registry:
        raise UsageError(f"unknown {kind} {name!r}: choose one of {', '.join(sorted(registry))}")
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)
