"""Tensor parallelism of the hf backend under a real mpirun (gloo on CPU): tp=2, and 2 replicas x tp=2, give the
answers of tp=1 on the embedded tiny model (2 attention heads, 2 KV heads: one of each per rank), and on a
grouped-query variant of it (4 query heads sharing 2 KV heads, as Llama-3's 32 share 8) in batches, raw and chat."""

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


def _args(out: Path, run_id: str, *opts: str, suite: str = SUITE, model: str = "tiny") -> list[str]:
    (out / "s.toml").write_text(suite)
    return ["run", "--suite", str(out / "s.toml"), "--backend", "hf", "--model", model, "--out", str(out),
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


GQA_SUITE = """
name = "tp-gqa"
[[tasks]]
task = "passkey"
lengths = [300, 700]
depths = [0.0, 0.5, 1.0]
samples = 1
max_new_tokens = 8
prompt_mode = "raw"
[[tasks]]
task = "niah_single"
lengths = [500]
depths = [0.3, 0.8]
samples = 2
max_new_tokens = 24
prompt_mode = "chat"
"""


def _gqa_tiny(dest: Path) -> Path:
    """The tiny model with each query head duplicated: 4 query heads in 2 groups sharing its 2 KV heads, o_proj
    halved to match. The same function as tiny, so it must give tiny's answers; under tp=2 each rank holds one
    group (2 query heads, 1 KV head), which is how an 8B model's 32/8 heads split."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from evalctx.models.embedded import resolve_model

    src = resolve_model("tiny").path
    tiny = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    cfg = {k: v for k, v in tiny.config.to_dict().items() if k != "transformers_version"}
    dim = cfg["head_dim"]
    assert cfg["num_attention_heads"] == cfg["num_key_value_heads"] == 2
    gqa = LlamaForCausalLM(LlamaConfig(**{**cfg, "num_attention_heads": 4}))
    weights = {}
    for name, w in tiny.state_dict().items():
        if name.endswith("q_proj.weight"):
            h = w.view(2, dim, -1)
            w = torch.cat([h[0], h[0], h[1], h[1]])
        elif name.endswith("o_proj.weight"):
            h = w.view(w.shape[0], 2, dim)
            w = torch.cat([h[:, 0], h[:, 0], h[:, 1], h[:, 1]], 1) / 2
        weights[name] = w
    gqa.load_state_dict(weights)
    gqa.save_pretrained(dest)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_grouped_query_tp2_in_batches_answers_like_tiny(tmp_path: Path) -> None:
    model = str(_gqa_tiny(tmp_path / "gqa"))
    assert main(_args(tmp_path, "tiny1", suite=GQA_SUITE) + ["--batch-size", "3"]) == 0
    base = _table(tmp_path, "tiny1")
    assert (base["status"] == "ok").all() and set(base["prompt_mode"]) == {"raw", "chat"}
    assert base["batch_size"].max() > 1
    args = _args(tmp_path, "gqa2", "tp=2", suite=GQA_SUITE, model=model) + ["--batch-size", "3"]
    proc = subprocess.run(mpirun_cmd(2, *args), capture_output=True, text=True, timeout=300, env=mpi_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _table(tmp_path, "gqa2")
    pd.testing.assert_frame_equal(base[COLUMNS], got[COLUMNS])
    assert (got["hf_tp"] == 2).all() and got["batch_size"].max() > 1


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
