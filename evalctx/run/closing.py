"""The end of a run: every finished journal row merged into results.parquet, the per-cell summary, and the run's
status (complete, complete with errors past the allowed rate, incomplete) written into the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from evalctx.results import rundir
from evalctx.run.status import COMPLETE, COMPLETE_WITH_ERRORS, INCOMPLETE


def close_run(run_dir: Path, rows: dict[str, dict[str, Any]], wanted: set[str], label: str | None,
              max_error_rate: float, manifest: Callable[[str], dict[str, Any]]) -> tuple[str, Any]:
    """Write results.parquet (the rows of ``wanted`` sample ids, sorted, relabelled ``label``), summary.csv and the
    manifest (``manifest(status)`` plus the counts); returns the status and the summary DataFrame."""
    import pandas as pd

    from evalctx.records import record_fields
    from evalctx.results.summary import summarize

    df = pd.DataFrame([r for sid, r in rows.items() if sid in wanted])
    if df.empty:
        df = pd.DataFrame(columns=record_fields())
    df = df.sort_values(["task", "context_length", "depth", "sample_id"]).reset_index(drop=True)
    if len(df):
        # One run, one label: a resume under another --label (same --run-id, same configuration) renames the
        # run; rows of the earlier attempts would otherwise keep the old one and split the run in reports.
        df["label"] = label
    missing = len(wanted) - len(df)
    n_error = int((df["status"] == "error").sum()) if len(df) else 0
    error_rate = n_error / len(wanted) if wanted else 0.0
    if missing:
        status = INCOMPLETE
    else:
        status = COMPLETE_WITH_ERRORS if error_rate > max_error_rate else COMPLETE
    rundir.atomic_write_parquet(df, run_dir / rundir.RESULTS)
    summary = summarize(df)
    rundir.atomic_write_text(run_dir / rundir.SUMMARY, summary.to_csv(index=False))
    doc = manifest(status)
    doc["counts"] = {k: int(v) for k, v in df["status"].value_counts().items()} if len(df) else {}
    doc["error_rate"] = error_rate
    doc["max_error_rate"] = max_error_rate
    rundir.write_manifest(run_dir, doc)
    return status, summary
