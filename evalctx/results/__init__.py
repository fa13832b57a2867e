"""Run results on disk: the run directory (rundir: names, the manifest, atomic writes), its append-only journals
(journal), the owner lock (lock), the prompt log (prompts) and per-cell summaries (summary). Reading finished runs
back is :mod:`evalctx.analysis` (``evalctx.load_runs``, ``suite_average``, ...), the layer above this one.

``summarize`` is importable from here, loaded on first use (pandas is not imported with the package).
"""

from __future__ import annotations

from evalctx.registry import lazy_attributes

_LAZY = {"summarize": "evalctx.results.summary"}

__getattr__ = lazy_attributes("evalctx.results", _LAZY)


__all__ = list(_LAZY)
