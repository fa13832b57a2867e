"""The memory planner: the Llama-2-70B worked example, KV arithmetic, the smallest tp, and the plan command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from evalctx.commands import plan as plan_cmd
from evalctx.errors import UsageError
from evalctx.capacity.plan import GB, ModelShape, kv_bytes_per_token, load_shape, plan

ENGINES = Path(__file__).parent / "data" / "engines"
LLAMA2_70B = ModelShape(num_layers=80, hidden_size=8192, num_attention_heads=64, num_kv_heads=8, head_dim=128,
                        intermediate_size=28672, vocab_size=32000)


def test_worked_example_llama2_70b_fp16_weights_fp8_kv():
    p = plan(LLAMA2_70B, 32 * 1024, tp=8, weight_dtype="fp16", kv_dtype="fp8")
    assert p.params == pytest.approx(68.98e9, rel=1e-3)
    assert 135 * GB < p.weight_bytes < 142 * GB  # ~140 GB of weights
    assert p.kv_bytes_per_token == 2 * 80 * 8 * 128 * 1
    assert 4.8 * GB < p.kv_bytes < 5.5 * GB  # ~5 GB of KV per 32K tokens
    assert 17.5 * GB < p.per_rank.before_activations < 18.8 * GB  # ~18 GB per GPU at TP8 before activations
    assert p.per_rank.kv_cache == p.kv_bytes // 8  # 8 KV heads over 8 ranks: one head each


def test_kv_bytes_per_token_per_rank_replicates_kv_heads_beyond_tp():
    whole = kv_bytes_per_token(80, 8, 128, "fp16")
    assert whole == 327_680
    assert kv_bytes_per_token(80, 8, 128, "fp16", tp=8) == whole // 8
    assert kv_bytes_per_token(80, 8, 128, "fp16", tp=16) == whole // 8  # heads replicated, not split further
    assert kv_bytes_per_token(80, 8, 128, "fp16", tp=8, pp=2) == whole // 16
    assert kv_bytes_per_token(32, 8, 128, "fp8", tp=4) == 16 * 1024  # reference table: Llama-3-8B TP4 FP8


def test_smallest_tp_that_fits():
    # 1M tokens of FP8 KV for a 70B model: ~172 GB of KV over 80 GB cards.
    p = plan(LLAMA2_70B, 1_048_576, tp=8, kv_dtype="fp8", gpu_memory_gb=80, max_num_tokens=4096)
    fits = {m.tp: m.fits for m in p.by_tp}
    assert fits[1] is False and fits[8] is True
    assert p.min_tp == min(t for t, ok in fits.items() if ok)
    assert p.min_tp in (4, 8)
    tiny_gpu = plan(LLAMA2_70B, 1_048_576, tp=8, kv_dtype="fp8", gpu_memory_gb=10)
    assert tiny_gpu.min_tp is None and tiny_gpu.per_rank.fits is False
    no_gpu = plan(LLAMA2_70B, 4096)
    assert no_gpu.min_tp is None and no_gpu.per_rank.fits is None


def test_tp_candidates_must_divide_heads():
    shape = ModelShape(4, 96, 6, 2, 16, 256, 1000)
    assert [m.tp for m in plan(shape, 128).by_tp] == [1, 2]
    with pytest.raises(UsageError, match="does not divide"):
        plan(shape, 128, tp=4)


def test_max_tokens_in_paged_kv_cache_suggestion():
    p = plan(LLAMA2_70B, 1_048_576, tokens_per_block=64)
    assert p.kv_tokens == 1_048_576
    assert 1_090_000 <= p.max_tokens_in_paged_kv_cache <= 1_110_000  # the README asks ~1,100,000
    assert p.max_tokens_in_paged_kv_cache % 64 == 0
    q = plan(LLAMA2_70B, 131_082, batch=2, tokens_per_block=64, kv_headroom=0)
    assert q.kv_tokens == 2 * 131_136 and q.max_tokens_in_paged_kv_cache == 2 * 131_136  # the 128K recipe value


def test_default_block_is_tensorrt_llm_1x_32_tokens():
    # 1.x PluginConfig.tokens_per_block and the LLM API's KvCacheConfig default to 32 (0.x engines: 64)
    p = plan(LLAMA2_70B, 131_082, kv_headroom=0)
    assert p.tokens_per_block == 32 and p.kv_tokens == 131_104  # 4097 blocks of 32 (64-token blocks: 131_136)


def test_quantized_weights_keep_embeddings_16bit_and_tied_heads_count_once():
    fp16 = plan(LLAMA2_70B, 1024, weight_dtype="fp16").weight_bytes
    int4 = plan(LLAMA2_70B, 1024, weight_dtype="int4").weight_bytes
    emb = 32000 * 8192
    dense = (2 * emb + 80 * 2 * 8192 + 8192) * 2  # embedding, lm_head and norms stay 16-bit
    assert int4 == pytest.approx((fp16 - dense) / 4 + dense, rel=1e-9)
    tied = ModelShape(**{**LLAMA2_70B.__dict__, "tie_word_embeddings": True})
    assert tied.params()["total"] == LLAMA2_70B.params()["total"] - emb


def test_load_shape_from_hf_and_engine(tmp_path):
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "num_hidden_layers": 80,
          "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    shape, engine = load_shape(tmp_path)
    assert engine is None and shape.head_dim == 128 and shape.params() == LLAMA2_70B.params()
    shape, engine = load_shape(ENGINES / "v1")
    assert engine is not None and engine.tp == 4 and shape.num_kv_heads == 8
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(UsageError, match="num_attention_heads"):
        load_shape(tmp_path)


def _run_cli(argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser()
    plan_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *argv])
    assert plan_cmd.main(args) == 0
    return capsys.readouterr().out


def test_plan_command_table_and_json(tmp_path, capsys):
    hf = {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
          "intermediate_size": 28672, "vocab_size": 32000, "torch_dtype": "float16"}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    out = _run_cli(["--config", str(tmp_path), "--context", "32768", "--tp", "8", "--kv-dtype", "fp8",
                    "--gpu-memory", "80"], capsys)
    assert "163,840 B/token" in out and "smallest tp that fits 80 GB" in out and "weights + KV" in out
    data = json.loads(_run_cli(["--config", str(ENGINES / "v1"), "--json"], capsys))
    # engine defaults: context = max_seq_len, tp 4, FP8 weights and KV, 32-token blocks
    assert data["context"] == 1_048_576 and data["per_rank"]["tp"] == 4
    assert data["kv_dtype"] == "fp8" and data["weight_dtype"] == "fp8" and data["tokens_per_block"] == 32
    assert data["kv_bytes_per_token_per_rank"] == 16 * 1024


def test_plan_command_needs_a_context_for_hf_configs(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
        "vocab_size": 100}))
    with pytest.raises(UsageError, match="--context"):
        _run_cli(["--config", str(tmp_path)], capsys)


@pytest.mark.parametrize("spelled,short", [("float16", "fp16"), ("half", "fp16"), ("torch.float16", "fp16"),
                                           ("FP16", "fp16"), ("bfloat16", "bf16"), ("float32", "fp32"),
                                           ("float", "fp32"), ("fp8", "fp8"), ("float8_e4m3fn", "fp8")])
def test_dtype_spellings_are_one_dtype(spelled, short):
    from evalctx.capacity.dtypes import canonical_dtype

    assert canonical_dtype(spelled) == short
    assert plan(LLAMA2_70B, 1024, weight_dtype=spelled).weight_bytes == plan(LLAMA2_70B, 1024,
                                                                             weight_dtype=short).weight_bytes


def test_plan_takes_tensorrt_llm_dtype_spellings_and_warns_beyond_the_positions(tmp_path, capsys):
    """``convert_checkpoint.py --dtype float16`` is TensorRT-LLM's own spelling: the issue's example."""
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
           "vocab_size": 100, "max_position_embeddings": 4096}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    data = json.loads(_run_cli(["--config", str(tmp_path), "--context", "8192", "--weight-dtype", "float16",
                                "--kv-dtype", "bfloat16", "--json"], capsys))
    assert (data["weight_dtype"], data["kv_dtype"]) == ("fp16", "bf16")
    err = capsys.readouterr().err
    parser = argparse.ArgumentParser()
    plan_cmd.add_parser(parser.add_subparsers(dest="command"))
    plan_cmd.main(parser.parse_args(["plan", "--config", str(tmp_path), "--context", "8192"]))
    err = capsys.readouterr().err
    assert "context 8,192 tokens exceeds the model's max_position_embeddings 4,096" in err
    plan_cmd.main(parser.parse_args(["plan", "--config", str(tmp_path), "--context", "4096"]))
    assert capsys.readouterr().err == ""
    with pytest.raises(UsageError, match="unknown weight dtype 'float17'.*fp16 \\(float16, half"):
        plan_cmd.main(parser.parse_args(["plan", "--config", str(tmp_path), "--context", "64",
                                         "--weight-dtype", "float17"]))
    # an embedded model by name
    assert "LlamaForCausalLM" in _run_cli(["--config", "tiny", "--context", "1024"], capsys)
