"""Tensor parallelism of the hf backend under a real mpirun (gloo on CPU): tp=2, and 2 replicas x tp=2, give the
answers of tp=1 on the embedded tiny model (2 attention heads, 2 KV heads: one of each per rank)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' tp plan on CPU needs it

from evalctx.cli import main  # noqa: E402
from mpi_util import mpi_env, mpirun_cmd  # noqa: E402

pytestmark = pytest.mark.mpi

SUITE = """
name = "tp"
[[tasks]]
task = "passkey"
lengths = [300, 700]
depths = [0.0, 1.0]
samples = 1
max_new_tokens = 8
"""
COLUMNS = ["completion", "score", "status", "n_prompt_tokens", "n_output_tokens", "finish_reason"]


def _args(out: Path, run_id: str, *opts: str, suite: str = SUITE) -> list[str]:
    (out / "s.toml").write_text(suite)
    return ["run", "--suite", str(out / "s.toml"), "--backend", "hf", "--model", "tiny", "--out", str(out),
            "--run-id", run_id, "--no-progress", "--backend-opt", "chunk_size=128",
            *[x for o in opts for x in ("--backend-opt", o)]]


def _table(out: Path, run_id: str) -> pd.DataFrame:
    return pd.read_parquet(out / run_id / "results.parquet").set_index("sample_id").sort_index()


def test_tp2_and_two_replicas_of_tp2_answer_like_tp1(tmp_path: Path) -> None:
    assert main(_args(tmp_path, "tp1")) == 0
    base = _table(tmp_path, "tp1")
    assert (base["status"] == "ok").all() and (base["hf_tp"] == 1).all()
    for n, run_id in ((2, "tp2"), (4, "tp2x2")):
        proc = subprocess.run(mpirun_cmd(n, *_args(tmp_path, run_id, "tp=2")), capture_output=True, text=True,
                              timeout=300, env=mpi_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = _table(tmp_path, run_id)
        pd.testing.assert_frame_equal(base[COLUMNS], got[COLUMNS])
        assert (got["hf_tp"] == 2).all()
        assert sorted(got["replica"].unique()) == list(range(n // 2))
        assert proc.stdout.count(f"run {run_id}") == 1  # one table, from world rank 0


def test_world_not_a_multiple_of_tp_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(mpirun_cmd(3, *_args(tmp_path, "bad", "tp=2")), capture_output=True, text=True,
                          timeout=120, env=mpi_env())
    assert proc.returncode != 0
    assert "not a multiple of the 2 ranks one replica needs" in proc.stderr


def test_prefix_reuse_under_tp2_answers_like_tp1_without_it(tmp_path: Path) -> None:
    """Every rank of a replica computes the same common prefix from the same broadcast prompts and crops its shard
    of the KV cache to it: a depth sweep at tp=2 with prefix_reuse answers as tp=1 cold does."""
    sweep = SUITE.replace("lengths = [300, 700]", "lengths = [400]").replace("depths = [0.0, 1.0]",
                                                                            "depths = { linear = 5 }")
    assert main(_args(tmp_path, "cold", "chunk_size=32", suite=sweep)) == 0
    base = _table(tmp_path, "cold")
    warm = _args(tmp_path, "warm", "chunk_size=32", "tp=2", "prefix_reuse=true", suite=sweep)
    proc = subprocess.run(mpirun_cmd(2, *warm), capture_output=True, text=True, timeout=300, env=mpi_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _table(tmp_path, "warm")
    pd.testing.assert_frame_equal(base[COLUMNS], got[COLUMNS])
    assert (got["n_cached_prompt_tokens"] > 0).sum() >= 3 and (base["n_cached_prompt_tokens"] == 0).all()
