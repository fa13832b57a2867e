"""Reading finished runs: :mod:`.runs` loads run directories into one tidy DataFrame and computes the effective
length and RULER's suite average; :mod:`.compare` is the regression gate between two runs (per cell, Fisher exact,
Holm), :mod:`.comparability` what differs between the runs besides their cells, :mod:`.stats` the intervals.

The entry points are importable from here, loaded on first use (pandas is not imported with the package).
"""

from __future__ import annotations

from evalctx.registry import lazy_attributes

_LAZY = {name: "evalctx.analysis.runs" for name in (
    "load_run", "load_runs", "effective_length", "suite_average", "suite_average_table", "suite_effective_length")}

__getattr__ = lazy_attributes("evalctx.analysis", _LAZY)

__all__ = list(_LAZY)
