"""``evalctx nightly-gate RUN_DIR``: the post-run half of the nightly job.

1. pick the baseline: ``--baseline``, else the last passing run of the same label and suite in history/runs.jsonl
   (whose directory still exists);
2. compare the run with it (the same gate as ``evalctx compare``); a run that did not complete fails;
3. append one line per summary cell to history/summary.csv (append-only, header written once);
4. write report.html / report.md into RUN_DIR (with the comparison and the nightly trend);
5. record a passing run in history/runs.jsonl, so it becomes the next night's baseline.

Exit 0 on pass (the first night, with no baseline, passes and says so), 1 on regression, 2 on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Iterator

from evalctx.commands.compare import add_gate_options, allowed, gate_kwargs
from evalctx.errors import UsageError

HISTORY_COLUMNS = ["run_id", "label", "date", "passed"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "nightly-gate", help="gate a finished nightly run against the baseline, report it, append the history",
        description="Compare RUN_DIR with the baseline (--baseline, else the last passing run of the same label "
                    "and suite in the history), write the report into RUN_DIR, append its summary to "
                    "HISTORY/summary.csv and, when it passes, record it in HISTORY/runs.jsonl. Exit 0: pass (or "
                    "first night without baseline), 1: regression or incomplete run, 2: bad input.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the nightly run directory (results/<run_id>)")
    p.add_argument("--baseline", metavar="DIR", default=None,
                   help="baseline run directory (default: the last passing run recorded in the history)")
    p.add_argument("--history", metavar="DIR", default="results/history",
                   help="history folder with summary.csv and runs.jsonl (default: results/history)")
    p.add_argument("--no-report", action="store_true", help="skip report.html/report.md")
    add_gate_options(p)
    p.set_defaults(func=main)
    return p


@contextlib.contextmanager
def _locked(history: Path) -> Iterator[None]:
    """Serialise writers of one history folder: two nightly jobs (two engines) may finish at the same time."""
    history.mkdir(parents=True, exist_ok=True)
    with open(history / ".lock", "a") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: appends stay line-sized, the header race is accepted
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def repair_history(history: Path) -> list[str]:
    """Before appending (with the history lock held): cut a torn last line off summary.csv and runs.jsonl (a kill
    or a full disk mid-append), so that the next night's line is not glued onto it; one note per repair."""
    from evalctx.results.journal import repair_tail

    def whole_csv_row(path: Path) -> Any:
        with path.open(newline="", encoding="utf-8") as fh:
            width = len(next(csv.reader(fh), []))
        return lambda data: len(next(csv.reader([data.decode("utf-8", "replace")]), [])) == width > 0

    def whole_json_row(data: bytes) -> bool:
        try:
            return isinstance(json.loads(data), dict)
        except ValueError:
            return False

    notes = []
    for name in ("summary.csv", "runs.jsonl"):
        path = history / name
        if not path.is_file():
            continue
        dropped = repair_tail(path, whole_csv_row(path) if name.endswith(".csv") else whole_json_row)
        if dropped:
            notes.append(f"{path}: dropped a torn last line ({dropped} bytes, left by a kill or a full disk)")
    return notes


def read_runs(history: Path) -> list[dict[str, Any]]:
    path = history / "runs.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line of a killed job; the others are still good
        if isinstance(entry, dict):
            out.append(entry)
    return out


def pick_baseline(history: Path, run_id: str, label: str, suite: str | None) -> tuple[Path | None, list[str]]:
    """The last passing run of the same label and suite whose directory still exists, and notes on skipped ones."""
    from evalctx.analysis.runs import is_run_dir

    notes = []
    for entry in reversed(read_runs(history)):
        if not entry.get("passed") or entry.get("run_id") == run_id:
            continue
        if entry.get("label") != label or (suite and entry.get("suite") and entry.get("suite") != suite):
            continue
        path = Path(str(entry.get("run_dir", "")))
        if is_run_dir(path):
            return path, notes
        notes.append(f"recorded baseline {entry.get('run_id')} is gone ({path}); trying an earlier one")
    return None, notes


def append_summary(history: Path, summary_rows: list[dict[str, Any]]) -> bool:
    """Append the rows to summary.csv in its existing column order; False if this run is already there."""
    path = history / "summary.csv"
    if path.is_file() and path.stat().st_size > 0:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            run_ids = {r.get("run_id") for r in reader}
        if summary_rows and summary_rows[0]["run_id"] in run_ids:
            return False  # gating the same run twice must not double its weight in the trend
        new_file = False
    else:
        header = list(summary_rows[0].keys()) if summary_rows else HISTORY_COLUMNS
        new_file = True
    # The file's own header wins: columns added to the summary later are left out rather than shifting every
    # column of the old rows (append-only means never rewriting them).
    with path.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerows(summary_rows)
    return True


def _summary_rows(df: Any, run_id: str, label: str, date: str, passed: bool) -> list[dict[str, Any]]:
    from evalctx.results.summary import summarize

    s = summarize(df)
    rows = []
    for r in s.to_dict("records"):
        rows.append({"run_id": run_id, "label": label, "date": date, "passed": passed, **r})
    return rows


def main(args: argparse.Namespace) -> int:
    from evalctx.analysis.runs import load_manifest, load_run
    from evalctx.analysis.comparability import check, differences
    from evalctx.analysis.compare import CompareResult, compare

    kwargs = gate_kwargs(args)
    run_dir, history = Path(args.run_dir), Path(args.history)
    if history.exists() and not history.is_dir():
        raise UsageError(f"--history {history}: not a directory")
    from evalctx.results import lock

    if lock.is_held(run_dir):
        raise UsageError(f"{run_dir} is still running (its run dir is locked): gate it once it has finished; "
                         "nothing was recorded")
    df = load_run(run_dir)
    manifest = load_manifest(run_dir)
    run_id, label = str(df["run_id"].iloc[0]), str(df["label"].iloc[0])
    suite = (manifest.get("suite") or {}).get("name")
    status = str(df["run_status"].iloc[0])
    date = str(manifest.get("created_at") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    if args.baseline is not None:
        baseline: Path | None = Path(args.baseline)
        load_run(baseline)  # a wrong --baseline is a usage error before anything is written
    else:
        baseline, notes = pick_baseline(history, run_id, label, suite)
        for note in notes:
            print(f"nightly-gate: {note}")

    result: CompareResult | None = None
    reasons = []
    if baseline is not None:
        base_df = load_run(baseline)
        diffs = differences(load_manifest(baseline), base_df, manifest, df)
        check(diffs, allowed(args))  # before anything is recorded: not comparable is neither pass nor fail
        result = compare(base_df, df, **kwargs)  # type: ignore[arg-type]
        result.differences = diffs
        print(f"baseline: {baseline}")
        print(result.to_markdown(only_notable=True), end="")
        if result.regressed:
            reasons.append(result.headline())
    else:
        print(f"nightly-gate: no baseline for label {label!r} (suite {suite}) in {history}: first night, "
              "passing without a comparison; this run becomes the baseline")
    if status == "complete_with_errors":
        reasons.append(f"run status is 'complete_with_errors': {int((df['status'] == 'error').sum())} error rows, "
                       f"above its --max-error-rate {manifest.get('max_error_rate', 0):g}")
    elif status != "complete":
        reasons.append(f"run status is {status!r}, not 'complete'")
    passed = not reasons

    with _locked(history):
        for note in repair_history(history):
            print(f"nightly-gate: {note}")
        if not append_summary(history, _summary_rows(df, run_id, label, date, passed)):
            print(f"nightly-gate: {run_id} is already in {history / 'summary.csv'}; not appended again")
    if not args.no_report:
        from evalctx.report.render import write_report

        try:
            html_path, _ = write_report([run_dir], run_dir, baseline=baseline, history=history,
                                        comparisons={run_id: result} if result is not None else None)
            print(f"report: {html_path}")
        except UsageError as exc:  # e.g. matplotlib missing: the verdict must not depend on the plots
            print(f"nightly-gate: report not written: {exc}")
    if passed:
        entry = {"run_id": run_id, "label": label, "suite": suite, "run_dir": str(run_dir.resolve()),
                 "date": date, "gated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "baseline_run_id": None if result is None else _baseline_id(baseline), "passed": True}
        with _locked(history):
            repair_history(history)
        with _locked(history), (history / "runs.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        print(f"nightly-gate: PASS ({run_id})")
        return 0
    print(f"nightly-gate: FAIL ({run_id}): " + "; ".join(reasons))
    return 1


def _baseline_id(baseline: Path | None) -> str | None:
    from evalctx.analysis.runs import load_manifest

    return None if baseline is None else str(load_manifest(baseline).get("run_id") or baseline.name)
