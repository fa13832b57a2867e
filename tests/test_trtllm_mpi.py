"""Several TensorRT-LLM replicas in one real mpirun, with the stand-in tensorrt_llm (tests/standin).

Under mpirun the stand-in executor uses the real MPI_COMM_WORLD: without participant ids it refuses a world larger
than the engine's tp*pp*cp (as executorImpl.cpp does), and with them it builds each replica's session with
MPI_Comm_create_group, a real collective, so a wrong id list fails or hangs here as it would on GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mpi_util import mpi_env, mpirun_cmd
from trtllm_util import STANDIN, make_engine

pytestmark = pytest.mark.mpi

SUITE = str(Path(__file__).parent / "data" / "suites" / "fake_small.toml")


def standin_env(log: Path) -> dict[str, str]:
    env = mpi_env()
    env["PYTHONPATH"] = os.pathsep.join([str(STANDIN), env.get("PYTHONPATH", "")])
    env["EVALCTX_STANDIN_LOG"] = str(log)
    return env


def placements(log: Path) -> dict[int, dict]:
    out = {}
    for f in log.glob("rank*.jsonl"):
        rec = json.loads(f.read_text().splitlines()[-1])
        out[rec["world_rank"]] = rec
    return out


def run(n: int, engine: Path, out: Path, log: Path) -> subprocess.CompletedProcess[str]:
    log.mkdir()
    cmd = mpirun_cmd(n, "run", "--suite", SUITE, "--backend", "trtllm", "--model", str(engine), "--tokenizer", "byte",
                     "--out", str(out), "--run-id", "r", "--no-progress", "--backend-opt", "max_batch_size=2")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=standin_env(log))


@pytest.mark.parametrize("ranks, tp, pp", [(2, 1, 1), (4, 2, 1), (4, 1, 2)])
def test_replicas_start_through_participant_ids(tmp_path: Path, ranks: int, tp: int, pp: int) -> None:
    engine = make_engine(tmp_path, tp=tp, pp=pp, max_seq_len=4096, max_batch_size=2)
    proc = run(ranks, engine, tmp_path / "out", tmp_path / "log")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "out" / "r" / "results.parquet")
    assert len(df) == 18 and (df["status"] == "ok").all() and (df["completion"] == " 42").all()
    assert sorted(df["replica"].unique()) == [0, 1] and (df["runtime_replicas"] == 2).all()
    assert (df["runtime_timing"] == "executor").all() and df["ttft_s"].notna().all()
    seen = placements(tmp_path / "log")
    assert sorted(seen) == list(range(ranks))
    local = {rank: int(rec["local_rank"]) for rank, rec in seen.items()}
    assert sorted(local.values()) == list(range(ranks))  # Open MPI's local ranks need not follow world ranks
    k = tp * pp
    for rank, rec in seen.items():
        leader = rank - rank % k
        members = list(range(leader, leader + k))
        order = members[::-1] if pp > 1 else members  # the executor's session order (tp = 1 here when pp > 1)
        # each replica runs on its own session and its own GPUs: the node-local ranks of its members
        assert rec["participants"] == members and rec["device_ids"] == [local[m] for m in order], rec
        assert rec["session_rank"] == order.index(rank) and rec["device"] == local[rank], rec
        assert rec["leader"] == (rank == leader)


def test_the_standin_refuses_a_world_larger_than_the_engine_without_participant_ids(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, max_seq_len=4096)
    script = ("import sys; from tensorrt_llm.bindings import executor as t\n"
              "cfg = t.ExecutorConfig(max_beam_width=1); cfg.parallel_config = t.ParallelConfig()\n"
              f"t.Executor({str(engine)!r}, t.ModelType.DECODER_ONLY, cfg)\n")
    cmd = mpirun_cmd(2, "tasks")[:-4] + [sys.executable, "-c", script]  # mpirun flags, then our own program
    log = tmp_path / "log"
    log.mkdir()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=standin_env(log))
    assert proc.returncode != 0
    assert "participantIds are not specified" in proc.stderr
