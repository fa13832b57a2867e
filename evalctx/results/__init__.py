"""Run results: the run directory (rundir), its journals (journal), per-cell summaries (summary), the end-of-run
table (table).

The analysis entry points are re-exported here, imported on first use so that importing a submodule (the runner
imports rundir) never loads pandas: ``evalctx.results.load_runs``, ``summarize``, ``effective_length``,
``suite_average`` (RULER's per-length average over a suite's tasks) and ``suite_effective_length``.
"""

from __future__ import annotations

from evalctx.registry import lazy_attributes

_LAZY = {
    "load_run": "evalctx.analysis.runs",
    "load_runs": "evalctx.analysis.runs",
    "effective_length": "evalctx.analysis.runs",
    "suite_average": "evalctx.analysis.runs",
    "suite_average_table": "evalctx.analysis.runs",
    "suite_effective_length": "evalctx.analysis.runs",
    "summarize": "evalctx.results.summary",
}

__getattr__ = lazy_attributes("evalctx.results", _LAZY)


__all__ = list(_LAZY)
