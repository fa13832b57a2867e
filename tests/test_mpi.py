"""Runs under a real mpirun: replicas give the same table as one process; TP followers see identical batches;
a failing rank ends the job; a killed job resumes with another rank count."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from evalctx.results.prompts import read_prompts
from mpi_util import mpi_env, mpirun_cmd

pytestmark = pytest.mark.mpi

SUITE = str(Path(__file__).parent / "data" / "suites" / "fake_small.toml")
STABLE = ["sample_id", "task", "context_length", "depth", "seed", "target", "completion", "extracted", "score",
          "status", "n_prompt_tokens", "needle_token_index", "prompt_sha1"]


def args(out: Path, run_id: str, *extra: str) -> list[str]:
    return ["run", "--suite", SUITE, "--backend", "fake", "--tokenizer", "byte", "--out", str(out),
            "--run-id", run_id, "--no-progress", *extra]


def table(out: Path, run_id: str) -> pd.DataFrame:
    df = pd.read_parquet(out / run_id / "results.parquet")
    return df[STABLE].sort_values("sample_id").reset_index(drop=True)


def run_mpi(n: int, *a: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mpirun_cmd(n, *a), capture_output=True, text=True, timeout=timeout, env=mpi_env())


def test_replicas_match_single_process(tmp_path: Path) -> None:
    single = subprocess.run(mpirun_cmd(1, *args(tmp_path, "n1")), capture_output=True, text=True, env=mpi_env())
    assert single.returncode == 0, single.stderr
    base = table(tmp_path, "n1")
    for n in (2, 3):
        proc = run_mpi(n, *args(tmp_path, f"n{n}", "--log-samples"))
        assert proc.returncode == 0, proc.stderr
        got = table(tmp_path, f"n{n}")
        pd.testing.assert_frame_equal(base, got)
        full = pd.read_parquet(tmp_path / f"n{n}" / "results.parquet")
        assert sorted(full["replica"].unique()) == list(range(n))
        # Only rank 0 prints the table, and its closing line counts every replica's new samples.
        assert proc.stdout.count("run n") == 1
        assert f"{len(base)} new of {len(base)} samples" in proc.stdout, proc.stdout
        # Every replica leader logs the prompts it ran.
        assert set(read_prompts(tmp_path / f"n{n}")) == set(base["sample_id"])
        assert len(list((tmp_path / f"n{n}" / "prompts").glob("replica-*.jsonl"))) == n


def test_tp_followers_receive_identical_batches(tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    proc = run_mpi(4, *args(tmp_path, "tp", "--backend", "fake-tp", "--backend-opt", "tp=2",
                            "--backend-opt", f"record_dir={rec}", "--batch-size", "2"))
    assert proc.returncode == 0, proc.stderr
    logs = {r: (rec / f"rank{r}.txt").read_text().splitlines() for r in range(4)}
    assert logs[0] and logs[2]
    assert logs[0] == logs[1]  # replica 0: leader 0, follower 1
    assert logs[2] == logs[3]  # replica 1: leader 2, follower 3
    assert logs[0] != logs[2]
    df = pd.read_parquet(tmp_path / "tp" / "results.parquet")
    assert df["sample_id"].is_unique and (df["score"] == 1.0).all()


def test_world_not_multiple_of_tp_is_usage_error(tmp_path: Path) -> None:
    proc = run_mpi(3, *args(tmp_path, "bad", "--backend", "fake-tp", "--backend-opt", "tp=2"))
    assert proc.returncode != 0
    assert "multiple" in proc.stderr


def test_raising_rank_ends_job_quickly(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = run_mpi(3, *args(tmp_path, "boom", "--backend-opt", "raise_on_rank=1", "--backend-opt", "raise_after=1",
                            "--backend-opt", "delay_s=0.05"), timeout=90)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "rank 1" in proc.stderr
    # What the other replicas finished is on disk.
    journals = list((tmp_path / "boom" / "journal").glob("replica-*.jsonl"))
    assert journals


def test_sigkill_mid_run_then_resume_with_other_rank_count(tmp_path: Path) -> None:
    cmd = mpirun_cmd(2, *args(tmp_path, "k", "--backend-opt", "delay_s=0.2"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=mpi_env(),
                            start_new_session=True)
    jdir = tmp_path / "k" / "journal"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        n = sum(len(p.read_text().splitlines()) for p in jdir.glob("*.jsonl")) if jdir.exists() else 0
        if n >= 4:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.5)
    proc2 = run_mpi(3, *args(tmp_path, "k", "--backend-opt", "delay_s=0.2"))
    assert proc2.returncode == 0, proc2.stderr
    df = pd.read_parquet(tmp_path / "k" / "results.parquet")
    assert df["sample_id"].is_unique and len(df) == 18 and (df["score"] == 1.0).all()


def test_ctrl_c_on_the_launcher_ends_the_job(tmp_path: Path) -> None:
    proc = subprocess.Popen(mpirun_cmd(2, *args(tmp_path, "int", "--backend-opt", "delay_s=0.3")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=mpi_env(),
                            start_new_session=True)
    jdir = tmp_path / "int" / "journal"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (jdir.exists() and any(p.stat().st_size for p in jdir.glob("*"))):
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mpirun did not end within 30 s of Ctrl-C")
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 30
    rows = sum(len(p.read_text().splitlines()) for p in jdir.glob("*.jsonl"))
    assert rows >= 1
