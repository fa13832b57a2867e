"""The hf memory arithmetic (evalctx.capacity.memory) and ``evalctx plan --backend hf``: the issue's Llama-3-8B example."""

from __future__ import annotations

import argparse
import json

import pytest

from evalctx.commands import plan as plan_cmd
from evalctx.errors import UsageError
from evalctx.capacity.memory import hf_activation_bytes, hf_rank_memory, longest_fitting
from evalctx.capacity.plan import GB, ModelShape

GiB = 2**30
LLAMA3_8B = ModelShape(num_layers=32, hidden_size=4096, num_attention_heads=32, num_kv_heads=8, head_dim=128,
                       intermediate_size=14336, vocab_size=128256)
H200 = 143771 * 2**20  # bytes, as torch.cuda.get_device_properties reports one
ONE_M = 1_048_576


def test_llama3_8b_at_1m_needs_two_h200s():
    # The issue: "about 128 GiB of KV cache in bf16 plus 16 GB of weights: it does not fit one 141 GB GPU".
    one = hf_rank_memory(LLAMA3_8B, ONE_M, chunk=8192, tp=1)
    assert one.kv_cache == 128 * GiB
    assert one.weights == pytest.approx(16.06e9, rel=1e-3)  # 8.03 B parameters in bf16
    assert not one.fits(H200) and not one.fits(141 * GB)
    two = hf_rank_memory(LLAMA3_8B, ONE_M, chunk=8192, tp=2)
    assert two.kv_cache == 64 * GiB
    # embedding replicated, the rest halved
    assert two.weights == pytest.approx(128256 * 4096 * 2 + (one.weights - 128256 * 4096 * 2) / 2, rel=1e-4)
    assert two.fits(H200)
    assert "GB per GPU (weights 16.1 + KV cache 137.4" in one.breakdown()


def test_kv_scales_with_batch_and_tokens_and_replicates_beyond_kv_heads():
    base = hf_rank_memory(LLAMA3_8B, 4096, chunk=1024)
    assert hf_rank_memory(LLAMA3_8B, 8192, chunk=1024).kv_cache == 2 * base.kv_cache
    assert hf_rank_memory(LLAMA3_8B, 4096, chunk=1024, batch=3).kv_cache == 3 * base.kv_cache
    assert hf_rank_memory(LLAMA3_8B, 4096, chunk=1024, tp=16).kv_cache == base.kv_cache // 8  # 8 KV heads
    assert hf_rank_memory(LLAMA3_8B, 4096, chunk=1024, dtype="fp32").kv_cache == 2 * base.kv_cache


def test_activations_bounded_by_the_chunk_only_with_the_lower_right_sdpa():
    short = hf_activation_bytes(LLAMA3_8B, 8192, 32768)
    assert hf_activation_bytes(LLAMA3_8B, 8192, ONE_M) == short  # no mask, no scores: context-independent
    assert 0.5 * GiB < short < 1.5 * GiB  # 3 x chunk x intermediate x 2 bytes dominates
    assert hf_activation_bytes(LLAMA3_8B, 16384, 32768) == pytest.approx(2 * short, rel=0.01)
    stock = hf_activation_bytes(LLAMA3_8B, 8192, ONE_M, attention="sdpa")
    assert stock - short == pytest.approx(8192 * ONE_M * 3, rel=1e-6)  # the boolean mask, then a bf16 bias
    # chunk 0 is the whole prompt in one step
    assert hf_rank_memory(LLAMA3_8B, 4096, chunk=0).chunk == 4096
    assert hf_rank_memory(LLAMA3_8B, 4096, chunk=8192).chunk == 4096


def test_longest_fitting_is_the_boundary():
    n = longest_fitting(LLAMA3_8B, H200, chunk=8192, tp=1)
    assert hf_rank_memory(LLAMA3_8B, n, chunk=8192).fits(H200)
    assert not hf_rank_memory(LLAMA3_8B, n + 1, chunk=8192).fits(H200)
    assert 900_000 < n < ONE_M
    assert longest_fitting(LLAMA3_8B, 10 * GB, chunk=8192) == 0  # the weights alone do not fit


def _plan(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    parser = argparse.ArgumentParser()
    plan_cmd.add_parser(parser.add_subparsers(dest="command"))
    assert plan_cmd.main(parser.parse_args(["plan", *argv])) == 0
    return capsys.readouterr().out


@pytest.fixture
def llama3_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
        "torch_dtype": "bfloat16"}))
    return tmp_path


def test_plan_command_for_hf(llama3_dir, capsys):
    out = _plan(["--backend", "hf", "--config", str(llama3_dir), "--context", str(ONE_M + 32),
                 "--gpu-memory", "150.75", "--chunk-size", "8192"], capsys)
    assert "bf16 KV cache, preallocated for 1,048,608 tokens" in out
    assert "smallest tp that fits 150.75 GB per GPU: tp 2" in out
    line_tp1 = next(x for x in out.splitlines() if x.strip().startswith("1 "))
    assert " no " in line_tp1 and "137.44" in line_tp1
    data = json.loads(_plan(["--backend", "hf", "--config", str(llama3_dir), "--context", "131072", "--tp", "2",
                             "--json"], capsys))
    assert data["per_rank"]["tp"] == 2 and data["per_rank"]["kv_cache"] == 131072 * 65536
    assert data["dtype"] == "bf16" and data["by_tp"][0]["fits"] is None


def test_plan_command_for_hf_refuses_what_hf_cannot_do(llama3_dir, capsys):
    with pytest.raises(UsageError, match=r"KV cache in the model dtype \(bf16; --weight-dtype sets it\), fp8 or int8, not fp16"):
        _plan(["--backend", "hf", "--config", str(llama3_dir), "--context", "1024", "--kv-dtype", "fp16"], capsys)
    with pytest.raises(UsageError, match="runs fp32, fp16 or bf16"):
        _plan(["--backend", "hf", "--config", str(llama3_dir), "--context", "1024", "--weight-dtype", "int4"], capsys)
    with pytest.raises(UsageError, match="does not divide"):
        _plan(["--backend", "hf", "--config", str(llama3_dir), "--context", "1024", "--tp", "3"], capsys)


def test_plan_for_hf_uses_the_dtype_and_attention_the_backend_runs_on_cuda(tmp_path, capsys):
    # The embedded model's checkpoint is float32, but the backend's dtype=auto runs bfloat16 on CUDA: planning in
    # fp32 doubled its KV cache (3.22 GB at 1M instead of 1.61).
    data = json.loads(_plan(["--backend", "hf", "--config", "tiny", "--context", str(ONE_M), "--json"], capsys))
    assert data["dtype"] == "bf16" and data["attn_implementation"] == "evalctx_sdpa"
    assert data["per_rank"]["kv_cache"] == ONE_M * 3 * 2 * 64 * 2 * 2  # layers x KV heads x head_dim x K,V x bf16
    # A sliding-window model runs stock sdpa, whose chunk x context mask the plan must count as the preflight does.
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
           "vocab_size": 32000, "sliding_window": 4096}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = _plan(["--backend", "hf", "--config", str(tmp_path), "--context", "131072", "--chunk-size", "8192"], capsys)
    assert "attention sdpa (not plain causal" in out
    mistral = ModelShape(num_layers=32, hidden_size=4096, num_attention_heads=32, num_kv_heads=8, head_dim=128,
                         intermediate_size=14336, vocab_size=32000)
    masked = hf_rank_memory(mistral, 131072, chunk=8192, attention="sdpa")
    assert f"activations (chunk   8192)    {masked.activations / GB:>8,.2f}" in out


def test_plan_for_hf_refuses_trtllm_only_settings(llama3_dir, capsys):
    with pytest.raises(UsageError, match="--pp, --max-num-tokens are TensorRT-LLM settings"):
        _plan(["--backend", "hf", "--config", str(llama3_dir), "--context", "1024", "--pp", "2",
               "--max-num-tokens", "4096"], capsys)
    _plan(["--backend", "hf", "--config", str(llama3_dir), "--context", "1024", "--pp", "1"], capsys)  # a no-op


def test_readme_quotes_the_benchmark_csv_and_the_plan_it_names():
    """The README's "Measured on GPUs" numbers are the committed CSV's, and its plan quote is today's arithmetic."""
    import csv
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = root / "README.md"
    text = " ".join(readme.read_text().split())
    rows = list(csv.DictReader((root / "benchmarks/results/hf_long_2xH200_2026-11-30.csv").open()))
    names = {32768: "32K", 131072: "128K", 1048576: "1M"}
    for r in (r for r in rows if r["layers"] == "4"):
        ttft, ideal = float(r["ttft_s"]), float(r["ideal_s"])
        digits = 3 if ttft < 1 else 2 if ttft < 10 else 1
        line = (f"| {names[int(r['length'])]} | {r['tp']} | {ttft:.{digits}f} s | {ideal:.{digits}f} s | "
                f"{float(r['of_ideal']):.0%} | {float(r['decode_ms']):.1f} | {float(r['peak_GiB']):.2f} "
                f"({float(r['planned_GiB']):.2f}) |")
        assert line in text, line
    full = next(r for r in rows if r["layers"] == "32")
    assert f"TTFT {float(full['ttft_s']):.1f} s against an ideal of {float(full['ideal_s']):.1f} s " \
           f"({float(full['of_ideal']):.0%})" in text
    m = re.search(r"--context (\d+) --chunk-size (\d+) --gpu-memory ([\d.]+)`: ([\d.]+) GB needed, ([\d,]+) tokens fit",
                  text)
    assert m, "the README's plan quote"
    context, chunk, gpu = int(m[1]), int(m[2]), float(m[3]) * GB
    assert f"{hf_rank_memory(LLAMA3_8B, context, chunk=chunk).total / GB:.1f}" == m[4]
    assert f"{longest_fitting(LLAMA3_8B, gpu, chunk=chunk):,}" == m[5]
