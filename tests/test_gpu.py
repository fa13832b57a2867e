"""GPU checks of the hf backend (run on purpose: python -m pytest -m gpu): the lower-right SDPA and the
preallocated cache on CUDA, and tp=2 over NCCL under mpirun."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from evalctx.cli import main  # noqa: E402

SUITE = """
name = "gpu"
[[tasks]]
task = "passkey"
lengths = [512, 1024, 16384]
depths = [0.0, 0.5, 1.0]
samples = 2
max_new_tokens = 8
"""


def _run(tmp_path: Path, run_id: str, *opts: str) -> pd.DataFrame:
    suite = tmp_path / "s.toml"
    suite.write_text(SUITE)
    flags = [x for o in opts for x in ("--backend-opt", o)]
    assert main(["run", "--suite", str(suite), "--model", "tiny", "--out", str(tmp_path), "--run-id", run_id,
                 "--no-progress", *flags]) == 0
    return pd.read_parquet(tmp_path / run_id / "results.parquet").set_index("sample_id").sort_index()


def test_tiny_on_cuda_lower_right_matches_stock_sdpa(tmp_path: Path) -> None:
    auto = _run(tmp_path, "auto", "chunk_size=1000")
    stock = _run(tmp_path, "stock", "attn_implementation=sdpa", "chunk_size=1000")
    assert (auto["hf_attn_implementation"] == "evalctx_sdpa").all()
    assert (auto["hf_device"] == "cuda").all() and auto["peak_memory_bytes"].gt(0).all()
    assert auto["completion"].tolist() == stock["completion"].tolist()
    # Inside its training length the embedded model finds every passkey.
    assert (auto.loc[auto["context_length"] <= 1024, "score"] == 1.0).all()


def test_tp2_on_two_gpus_answers_like_tp1(tmp_path: Path) -> None:
    """NCCL under a real mpirun: one GPU per rank, the answers of one GPU."""
    import subprocess

    from mpi_util import mpi_env, mpirun_cmd

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    one = _run(tmp_path, "tp1", "chunk_size=1000")
    (tmp_path / "s.toml").write_text(SUITE)
    proc = subprocess.run(mpirun_cmd(2, "run", "--suite", str(tmp_path / "s.toml"), "--model", "tiny", "--out",
                                     str(tmp_path), "--run-id", "tp2", "--no-progress", "--backend-opt", "tp=2",
                                     "--backend-opt", "chunk_size=1000"),
                          capture_output=True, text=True, timeout=600, env=mpi_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = pd.read_parquet(tmp_path / "tp2" / "results.parquet").set_index("sample_id").sort_index()
    assert (two["hf_tp"] == 2).all() and (two["hf_attn_implementation"] == "evalctx_sdpa").all()
    assert two["completion"].tolist() == one["completion"].tolist()
    assert two["peak_memory_bytes"].gt(0).all()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (16, 4, 128), (2, 2, 64)])
def test_cuda_attention_path_passes_its_check(heads: int, kv_heads: int, dim: int, batch: int) -> None:
    """The cuDNN block path (Llama-3-8B heads at tp 1 and 2, the tiny model's), for one sequence and a batch,
    agrees with float32 attention; failing here means the lower-right SDPA fell back to the slower flash kernel."""
    from evalctx.backends.hf.attention import cuda_kernels, cuda_path_ok

    q = torch.zeros(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.zeros(1, kv_heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    assert cuda_path_ok(q, k)
    assert cuda_kernels().startswith("cuDNN")


def test_prefix_reuse_on_cuda_answers_like_cold(tmp_path: Path) -> None:
    """bf16 on the cuDNN path: a reused prefix of whole chunks leaves every computed position's inputs, shapes and
    key blocks as in a cold prefill, so the answers are the same, and most rows are warm."""
    cold = _run(tmp_path, "cold", "chunk_size=1000")
    warm = _run(tmp_path, "warm", "chunk_size=1000", "prefix_reuse=true")
    assert warm["completion"].tolist() == cold["completion"].tolist()
    assert (cold["n_cached_prompt_tokens"] == 0).all()
    # At 16384 prompts of one depth share all but their needles: reuse serves whole chunks of 1000 to at least two
    # rows (H100, 2026-12-08: [0, 0, 0, 8000, 8000, 16000]; which pairs follow each other is prefix_order's choice).
    long = warm[warm["context_length"] == 16384]["n_cached_prompt_tokens"]
    assert (long > 0).sum() >= 2 and (long % 1000 == 0).all() and long.max() <= 16000


def test_every_family_in_bf16_on_cuda_answers_as_its_own_generate(tmp_path: Path) -> None:
    """The conformance matrix on CUDA in bf16: evalctx's own attention path (lower-right SDPA on cuDNN/flash) where
    the family is plain causal, transformers' otherwise; the reference is generate in bf16 on the same GPU. Answers
    may leave the reference only at a bf16 near-tie (evalctx.backends.hf.conformance)."""
    out = tmp_path / "matrix.md"
    assert main(["conformance", "--family", "all", "--backend-opt", "dtype=bfloat16", "--markdown", str(out)]) == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()[2:]]
    assert len(rows) == 16 * 20 and all(r[-1] == "ok" for r in rows)

