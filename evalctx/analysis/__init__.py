"""Reading finished runs: :mod:`.runs` loads run directories into one tidy DataFrame and computes the effective
length and RULER's suite average; :mod:`.table` is the end-of-run table; :mod:`.compare` is the regression gate
between two runs (per cell, Fisher exact, Holm), :mod:`.comparability` what differs between the runs besides their
cells (the intervals are :mod:`evalctx.stats`).

Every public name of :mod:`.runs` is importable from here, as it was from the former ``evalctx.analysis`` module,
loaded on first use (pandas is not imported with the package).
"""

from __future__ import annotations

from evalctx.registry import lazy_attributes

_LAZY = {name: "evalctx.analysis.runs" for name in (
    "load_run", "load_runs", "effective_length", "suite_average", "suite_average_table", "suite_effective_length",
    "summary", "length_accuracy", "effective_length_table", "suite_lengths", "suite_eff_text", "length_label",
    "is_run_dir", "load_manifest", "run_label", "RULER_THRESHOLD", "NOLIMA_RELATIVE")}

__getattr__ = lazy_attributes("evalctx.analysis", _LAZY)

__all__ = list(_LAZY)
