"""Name -> ``module:Class`` registries, imported only when a name is asked for (so `import evalctx` stays light)."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

from evalctx.errors import UsageError


def load_registered(registry: Mapping[str, str], name: str, kind: str) -> Any:
    """The object registered as ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in registry:
        raise UsageError(f"unknown {kind} {name!r}: choose one of {', '.join(sorted(registry))}")
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def lazy_attributes(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``table[name]`` (a module path) on first access of ``name``: a package
    re-exports analysis functions without importing pandas when it is imported."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
