"""A run that finished with error rows is never green: the regression gate on a rise of the error rate (however few
samples a cell has), the report, the nightly gate and run_eval.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evalctx.analysis import compare as cmp
from evalctx.analysis.runs import load_run
from evalctx.cli import main
from run_fixtures import write_run

REPO = Path(__file__).resolve().parent.parent
GATE_SUITE = str(Path(__file__).parent / "data" / "suites" / "gate_small.toml")
FEW = {"tasks": ("passkey",), "lengths": (4096, 8192), "depths": (0.0, 0.5, 1.0), "samples": 5}


def _with_errors(df, n: int):  # type: ignore[no-untyped-def]
    """The same run with its first ``n`` samples turned into error rows (a timeout, a cut answer)."""
    df = df.copy()
    idx = df.index[:n]
    df.loc[idx, "status"] = "error"
    df.loc[idx, "score"] = None
    df.loc[idx, "error"] = "timed out after 600 s (timeout_s) (after 4 attempts)"
    return df


def test_gate_fails_a_rise_of_the_error_rate_with_few_samples_per_cell(tmp_path: Path) -> None:
    base = load_run(write_run(tmp_path, "base", **FEW))
    cand = _with_errors(load_run(write_run(tmp_path, "cand", **FEW)), 2)  # 2 of 30 samples, 5 a cell
    result = cmp.compare(base, cand)
    assert result.regressed
    assert set(result.table["verdict"]) <= {"insufficient"}  # no cell test can see it at 5 samples a cell...
    assert result.errors["rose"] and result.errors["cand_errors"] == 2 and result.errors["base_errors"] == 0
    assert "error rate rose 0.0% -> 6.7%" in result.headline()  # ...the run-level rate does
    assert json.loads(result.to_json())["errors"]["rose"] is True
    assert not cmp.compare(base, cand, max_error_rate_rise=0.1).regressed
    assert not cmp.compare(_with_errors(base, 2), cand).regressed  # the same errors on both sides: no rise


def test_compare_command_takes_the_error_rate_rise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    base = write_run(tmp_path, "base", **FEW)
    cand = write_run(tmp_path, "cand", **FEW)
    parquet = cand / "results.parquet"
    _with_errors(pd.read_parquet(parquet), 3).to_parquet(parquet, index=False)
    assert main(["compare", str(base), str(cand)]) == 1
    assert "error rate rose 0.0% -> 10.0%" in capsys.readouterr().out
    assert main(["compare", str(base), str(cand), "--max-error-rate-rise", "0.1"]) == 0
    assert main(["compare", str(base), str(cand), "--max-error-rate-rise", "-1"]) == 2


def _fake_run(tmp_path: Path, run_id: str, *extra: str) -> int:
    return main(["run", "--suite", GATE_SUITE, "--backend", "fake", "--tokenizer", "byte", "--out", str(tmp_path),
                 "--run-id", run_id, "--label", "fake-model", "--no-progress", *extra])


def test_report_and_nightly_gate_say_complete_with_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _fake_run(tmp_path, "clean") == 0
    assert _fake_run(tmp_path, "errs", "--backend-opt", "fail_every=6") == 3
    m = json.loads((tmp_path / "errs" / "manifest.json").read_text())
    assert m["status"] == "complete_with_errors" and m["error_rate"] == pytest.approx(4 / 24)
    assert m["max_error_rate"] == 0.0 and m["counts"] == {"ok": 20, "error": 4}
    from evalctx.report.render import write_report

    _, md = write_report([tmp_path / "errs"])
    text = md.read_text()
    assert "complete_with_errors" in text and "4 of 24 samples are error rows" in text
    capsys.readouterr()
    code = main(["nightly-gate", str(tmp_path / "errs"), "--history", str(tmp_path / "history"),
                 "--baseline", str(tmp_path / "clean"), "--no-report"])
    out = capsys.readouterr().out
    assert code == 1 and "complete_with_errors" in out and "4 error rows" in out


def _sh(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(REPO / "run_eval.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_run_eval_sh_passes_exit_3_on_and_gates_a_nightly_run_with_errors(tmp_path: Path) -> None:
    common = ["--out", str(tmp_path), "--suite", GATE_SUITE, "--backend", "fake", "--tokenizer", "byte",
              "--label", "fake-model", "--no-progress"]
    errs = _sh(*common, "--run-id", "errs", "--backend-opt", "fail_every=6")
    assert errs.returncode == 3, errs.stderr
    allowed = _sh(*common, "--run-id", "allowed", "--backend-opt", "fail_every=6", "--max-error-rate", "0.2")
    assert allowed.returncode == 0, allowed.stderr
    night1 = _sh("--nightly", *common, "--run-id", "night1")
    assert night1.returncode == 0, night1.stderr + night1.stdout
    night2 = _sh("--nightly", *common, "--run-id", "night2", "--backend-opt", "fail_every=6")
    assert night2.returncode == 1 and "complete_with_errors" in night2.stdout  # gated, and it fails
    assert (tmp_path / "night2" / "report.html").is_file()


def test_the_error_note_shows_the_most_frequent_cause() -> None:
    """A run with error rows says why on screen: the most frequent message (the rest are in results.parquet)."""
    import pandas as pd

    from evalctx.cli import _error_note

    errors = pd.Series(["HTTP 500: engine crashed"] * 3 + ["timed out after 600 s"] + ["x" * 400])
    note = _error_note(errors, 10, 0.0, "complete_with_errors")
    assert note.startswith("evalctx: 5 of 10 samples are error rows (50.0%)") and "(exit 3)" in note
    assert "Most frequent error (3 of 5): HTTP 500: engine crashed." in note and "\n" not in note
    one = _error_note(pd.Series(["x" * 400]), 10, 0.5, "complete")
    assert "Error: " + "x" * 297 + "..." in one and "exit 3" not in one
