"""run_eval.sh end to end: help, MPI launch, exit codes, and the nightly mode with its gate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mpi_util import find_mpirun, mpi_env

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "run_eval.sh"
SUITE = str(Path(__file__).parent / "data" / "suites" / "gate_small.toml")


def sh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = mpi_env()
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"  # the venv's evalctx and mpirun
    e.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=e, timeout=180)


def test_help() -> None:
    proc = sh("--help")
    assert proc.returncode == 0 and "Usage: ./run_eval.sh" in proc.stdout and "--nightly" in proc.stdout


def test_bad_rank_count_is_usage_error() -> None:
    proc = sh("-n", "zero")
    assert proc.returncode == 2 and "positive integer" in proc.stderr


def test_exit_code_passes_through(tmp_path: Path) -> None:
    proc = sh("--out", str(tmp_path), "--suite", "missing.toml", "--backend", "fake", "--tokenizer", "byte")
    assert proc.returncode == 2 and "suite not found" in proc.stderr


@pytest.mark.mpi
def test_two_ranks_under_mpirun(tmp_path: Path) -> None:
    if find_mpirun() is None:
        pytest.skip("no mpirun")
    proc = sh("-n", "2", "--out", str(tmp_path), "--suite", SUITE, "--backend", "fake", "--tokenizer", "byte",
              "--run-id", "two", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "mpirun" in proc.stderr.splitlines()[0]
    df = pd.read_parquet(tmp_path / "two" / "results.parquet")
    assert sorted(df["replica"].unique()) == [0, 1] and len(df) == 24


def test_nightly_passes_then_catches_a_regression(tmp_path: Path) -> None:
    base = ["--nightly", "--out", str(tmp_path), "--suite", SUITE, "--backend", "fake", "--tokenizer", "byte",
            "--label", "fake-model", "--no-progress"]
    first = sh(*base, "--run-id", "night1")
    assert first.returncode == 0, first.stderr + first.stdout
    second = sh(*base, "--run-id", "night2")
    assert second.returncode == 0, second.stderr + second.stdout
    assert (tmp_path / "night2" / "report.html").is_file()
    bad = sh(*base, "--run-id", "night3", "--backend-opt", "miss_beyond=500")
    assert bad.returncode == 1, bad.stderr + bad.stdout
    history = pd.read_csv(tmp_path / "history" / "summary.csv")
    assert set(history["run_id"]) == {"night1", "night2", "night3"}
    # Gate options pass through: a gate flag the gate rejects is its usage error (exit 2), named in stderr.
    bad_flag = sh(*base, "--run-id", "night4", "--gate-opt", "--no-such-gate-flag")
    assert bad_flag.returncode == 2 and "--no-such-gate-flag" in bad_flag.stderr


def test_llmapi_launch_needs_several_ranks() -> None:
    proc = sh("--llmapi-launch", "--backend", "trtllm-llm")
    assert proc.returncode == 2 and "needs -n > 1" in proc.stderr


@pytest.mark.mpi
def test_llmapi_launch_runs_evalctx_once_under_mpirun(tmp_path: Path) -> None:
    """A launcher that does what trtllm-llmapi-launch does for evalctx: rank 0 runs the command without the MPI
    variables, the other ranks wait (they would be TensorRT-LLM workers)."""
    if find_mpirun() is None:
        pytest.skip("no mpirun")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "trtllm-llmapi-launch"
    launcher.write_text('#!/usr/bin/env bash\n[ "$OMPI_COMM_WORLD_RANK" = 0 ] || exit 0\n'
                        'for v in $(env | grep -o "^OMPI_[A-Z_]*\\|^PMIX_[A-Z_]*"); do unset "$v"; done\nexec "$@"\n')
    launcher.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    proc = sh("-n", "2", "--llmapi-launch", "--out", str(tmp_path), "--suite", SUITE, "--backend", "fake",
              "--tokenizer", "byte", "--run-id", "once", "--no-progress", env={"PATH": path})
    assert proc.returncode == 0, proc.stderr
    assert "trtllm-llmapi-launch" in proc.stderr.splitlines()[0]
    df = pd.read_parquet(tmp_path / "once" / "results.parquet")
    assert df["replica"].unique().tolist() == [0] and len(df) == 24  # one evalctx process did the whole run


def test_the_nightly_run_id_is_the_day_so_the_same_command_resumes(tmp_path: Path) -> None:
    """Issue 23, kind 6: after a stop, 'rerun the same command to resume' made a new run id to the second and
    started over."""
    import datetime as dt

    base = ["--nightly", "--out", str(tmp_path), "--suite", SUITE, "--backend", "fake", "--tokenizer", "byte",
            "--no-progress"]
    first = sh(*base)
    assert first.returncode == 0, first.stderr + first.stdout
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    runs = [p.name for p in tmp_path.iterdir() if p.name.startswith("nightly-")]
    assert runs == [f"nightly-{day}"] or len(runs) == 1  # a run across midnight UTC gets the next day's id
    again = sh(*base)
    assert again.returncode == 0
    assert "0 new of" in again.stdout and len([p for p in tmp_path.iterdir() if p.name.startswith("nightly-")]) <= 2
