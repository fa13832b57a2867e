"""``evalctx nightly-gate``: baseline from the history, exit codes, append-only history, report in the run dir."""

from __future__ import annotations

import csv
import json

import pytest

from evalctx.cli import main as cli_main
from run_fixtures import write_run

OPTS = {"tasks": ("passkey",), "lengths": (4096, 8192, 16384), "depths": (0.0, 1.0)}


def _night(root, day: int, **kwargs):  # type: ignore[no-untyped-def]
    return write_run(root, f"nightly-202601{day:02d}", created_at=f"2026-01-{day:02d}T02:00:00Z",
                     **{**OPTS, **kwargs})


def _gate(run, history, *extra: str) -> int:  # type: ignore[no-untyped-def]
    return cli_main(["nightly-gate", str(run), "--history", str(history), "--no-report", *extra])


def _runs(history) -> list[dict]:  # type: ignore[no-untyped-def]
    return [json.loads(line) for line in (history / "runs.jsonl").read_text().splitlines()]


def test_nights(tmp_path, capsys) -> None:
    history = tmp_path / "history"
    first, same, bad, after = (_night(tmp_path, 1), _night(tmp_path, 2), _night(tmp_path, 3, miss_from=16384),
                               _night(tmp_path, 4))
    assert _gate(first, history) == 0
    assert "first night" in capsys.readouterr().out
    assert _gate(same, history) == 0  # an identical rerun passes against night 1
    out = capsys.readouterr().out
    assert "nightly-20260101" in out and "PASS" in out
    assert _gate(bad, history) == 1  # missed needles at 16K
    out = capsys.readouterr().out
    assert "FAIL" in out and "| regression |" in out
    # The failed night is not a baseline: night 4 is compared with night 2 and passes.
    assert _gate(after, history) == 0
    assert "nightly-20260102" in capsys.readouterr().out
    runs = _runs(history)
    assert [r["run_id"] for r in runs] == ["nightly-20260101", "nightly-20260102", "nightly-20260104"]
    assert runs[1]["baseline_run_id"] == "nightly-20260101" and runs[0]["baseline_run_id"] is None
    with (history / "summary.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 3 * 2  # one line per (length, depth) cell per night, one header
    assert (history / "summary.csv").read_text().count("run_id,label,date,passed") == 1
    assert {r["passed"] for r in rows if r["run_id"] == "nightly-20260103"} == {"False"}
    assert {r["date"] for r in rows if r["run_id"] == "nightly-20260104"} == {"2026-01-04T02:00:00Z"}
    # Gating the same run again does not double it in the history.
    assert _gate(after, history) == 0
    with (history / "summary.csv").open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 24


def test_explicit_baseline_and_lost_coverage(tmp_path, capsys) -> None:
    history = tmp_path / "history"
    ref = _night(tmp_path, 1)
    shorter = _night(tmp_path, 2, lengths=(4096, 8192))  # 16K cells missing
    assert _gate(shorter, history, "--baseline", str(ref)) == 1
    assert "only_in_base" in capsys.readouterr().out
    assert _gate(shorter, history, "--baseline", str(ref), "--allow-missing") == 0
    assert cli_main(["nightly-gate", str(shorter), "--history", str(history), "--baseline",
                     str(tmp_path / "gone")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_other_labels_are_not_baselines(tmp_path, capsys) -> None:
    history = tmp_path / "history"
    assert _gate(_night(tmp_path, 1, label="fp16"), history) == 0
    assert _gate(_night(tmp_path, 2, label="int8kv", miss_from=8192), history) == 0
    assert capsys.readouterr().out.count("first night") == 2  # int8kv is not judged against fp16
    assert [r["label"] for r in _runs(history)] == ["fp16", "int8kv"]


def test_incomplete_run_fails(tmp_path, capsys) -> None:
    history = tmp_path / "history"
    assert _gate(_night(tmp_path, 1), history) == 0
    killed = _night(tmp_path, 2, journal_only=True, status="interrupted")
    assert _gate(killed, history) == 1
    assert "status is 'interrupted'" in capsys.readouterr().out


def test_gate_writes_the_report_with_the_trend(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    history = tmp_path / "history"
    opts = {"tasks": ("passkey",), "lengths": (4096, 8192), "depths": (0.5,)}
    assert cli_main(["nightly-gate", str(_night(tmp_path, 1, **opts)), "--history", str(history)]) == 0
    second = _night(tmp_path, 2, **opts)
    assert cli_main(["nightly-gate", str(second), "--history", str(history)]) == 0
    html = (second / "report.html").read_text()
    assert "Comparison with the baseline" in html and "Nightly trend" in html
    assert (second / "plots" / "trend.png").is_file()


def test_a_drop_spread_over_the_depths_fails_through_the_pooled_level(tmp_path, capsys) -> None:
    import pandas as pd

    history, five = tmp_path / "history", {"depths": (0.0, 0.25, 0.5, 0.75, 1.0)}
    ref, night = _night(tmp_path, 1, **five), _night(tmp_path, 2, **five)
    path = night / "results.parquet"
    df = pd.read_parquet(path)
    miss = (df.groupby(["task", "context_length", "depth"]).cumcount() < 3) & (df["context_length"] == 8192)
    df.loc[miss, "score"] = 0.0  # 20/20 -> 17/20 at every depth of 8K: no cell is significant, the length is
    df.to_parquet(path, index=False)
    assert _gate(night, history, "--baseline", str(ref)) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "| all |" in out and "pooled over 5 depths" in out
    assert _gate(night, history, "--baseline", str(ref), "--no-pooled") == 0
    assert "PASS" in capsys.readouterr().out


def test_a_torn_history_line_is_repaired_before_the_next_append(tmp_path, capsys) -> None:
    """Issue 23, kind 2: a kill or a full disk during the append leaves a torn last line in history/summary.csv
    (every later gate died on it) or runs.jsonl (the next night's line was swallowed)."""
    import json as _json

    from evalctx.cli import main

    runs = []
    for i in range(3):
        assert main(["run", "--backend", "fake", "--tasks", "passkey", "--samples", "2", "--lengths", "512",
                     "--out", str(tmp_path), "--run-id", f"n{i}", "--no-progress"]) == 0
        runs.append(tmp_path / f"n{i}")
    history = tmp_path / "history"
    gate = ["--history", str(history), "--latency-tolerance", "1000"]
    assert main(["nightly-gate", str(runs[0]), *gate]) == 0
    with (history / "summary.csv").open("a") as fh:
        fh.write('n9,model,"2026-12-0')  # torn mid-field, inside a quote
    with (history / "runs.jsonl").open("a") as fh:
        fh.write('{"run_id": "n9", "pass')
    capsys.readouterr()
    assert main(["nightly-gate", str(runs[1]), *gate]) == 0
    out = capsys.readouterr().out
    assert "summary.csv: dropped a torn last line" in out
    assert main(["nightly-gate", str(runs[2]), *gate]) == 0
    entries = [_json.loads(line) for line in (history / "runs.jsonl").read_text().splitlines()]
    assert [e["run_id"] for e in entries] == ["n0", "n1", "n2"]
    import pandas as pd

    assert sorted(pd.read_csv(history / "summary.csv")["run_id"].unique()) == ["n0", "n1", "n2"]
