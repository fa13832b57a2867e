"""Engine config.json in both layouts, the derived facts, and the one-line errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evalctx.capacity.engine_config import load_engine_config
from evalctx.errors import UsageError

ENGINES = Path(__file__).parent / "data" / "engines"


def test_v1_layout_reads_every_field():
    c = load_engine_config(ENGINES / "v1")
    assert c.layout == "pretrained_config" and c.version == "1.2.1"
    assert (c.tp, c.pp, c.cp, c.world_size, c.gpus_per_node) == (4, 1, 1, 4, 8)
    assert (c.dtype, c.quant_algo, c.kv_cache_quant_algo) == ("float16", "FP8", "FP8")
    assert (c.kv_dtype, c.weight_dtype) == ("fp8", "fp8")
    assert (c.max_seq_len, c.max_input_len, c.max_num_tokens, c.max_batch_size) == (1048576, 1024, 4096, 1)
    assert c.use_paged_context_fmha and c.paged_kv_cache and c.supports_chunked_context
    assert c.tokens_per_block == 32 and not c.lora_plugin and c.max_lora_rank == 64
    assert (c.num_layers, c.num_attention_heads, c.num_key_value_heads, c.head_size) == (32, 32, 8, 128)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (4096, 14336, 128256)
    assert c.architecture == "LlamaForCausalLM" and c.rotary_base == 500000.0
    assert c.defaults_used == ()


def test_v0_builder_config_layout():
    c = load_engine_config(ENGINES / "v0" / "config.json")  # the file itself works too
    assert c.layout == "builder_config" and c.version is None
    assert (c.tp, c.pp, c.world_size) == (2, 1, 2)
    # quant_mode 66 = INT8 weights (2) + INT8 KV cache (64)
    assert (c.quant_algo, c.kv_cache_quant_algo, c.kv_dtype, c.weight_dtype) == ("W8A16", "INT8", "int8", "int8")
    assert c.max_seq_len == 2048 + 512 and c.max_output_len == 512
    assert not c.use_paged_context_fmha and c.paged_kv_cache and not c.supports_chunked_context
    assert c.tokens_per_block == 64 and c.multi_block_mode is False
    assert (c.num_layers, c.num_attention_heads, c.num_key_value_heads, c.head_size) == (32, 32, 32, 128)
    assert "builder_config.max_seq_len=max_input_len+max_output_len" in c.defaults_used


def test_v0_10_pretrained_layout_with_legacy_keys():
    c = load_engine_config(ENGINES / "v0_10")
    assert c.layout == "pretrained_config" and c.version == "0.10.0"
    assert c.kv_cache_quant_algo == "INT8"  # from the legacy pretrained_config.kv_dtype
    assert c.max_seq_len == 4096 and c.max_output_len == 1024
    assert c.lora_plugin and c.multi_block_mode is False and c.head_size == 128
    assert c.dtype == "bfloat16" and c.kv_dtype == "int8"


def test_missing_keys_take_the_writing_release_defaults(tmp_path):
    data = json.loads((ENGINES / "v1" / "config.json").read_text())
    del data["build_config"]["plugin_config"]["use_paged_context_fmha"]
    del data["build_config"]["plugin_config"]["tokens_per_block"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    c = load_engine_config(tmp_path)
    assert c.use_paged_context_fmha and c.tokens_per_block == 32  # 1.x defaults
    data["version"] = "0.12.0"
    (tmp_path / "config.json").write_text(json.dumps(data))
    c = load_engine_config(tmp_path)
    assert not c.use_paged_context_fmha and c.tokens_per_block == 64  # 0.x defaults
    assert "build_config.plugin_config.use_paged_context_fmha=False" in c.defaults_used


def test_columns_and_manifest_are_flat_and_json_ready():
    c = load_engine_config(ENGINES / "v1")
    cols = c.to_columns()
    assert cols["engine_dtype"] == "float16" and cols["engine_tp"] == 4 and cols["engine_kv_dtype"] == "fp8"
    assert all(k.startswith("engine_") for k in cols)
    assert all(v is None or isinstance(v, (str, int, float, bool)) for v in cols.values())
    manifest = c.to_manifest()
    json.dumps(manifest)
    assert manifest["supports_chunked_context"] is True and manifest["world_size"] == 4


@pytest.mark.parametrize("content, fragment", [
    (None, "engine config not found"),
    ("{not json", "not valid JSON"),
    ('{"architectures": ["LlamaForCausalLM"]}', "not a TensorRT-LLM engine config"),
    ('{"pretrained_config": {"hidden_size": 8}, "build_config": {}}', "missing pretrained_config.num_attention_heads"),
    ('{"builder_config": {"num_heads": 4, "hidden_size": 8, "num_layers": "x"}}', "builder_config.num_layers must"),
    ('{"pretrained_config": {"num_attention_heads": 4, "hidden_size": 8, "num_hidden_layers": 2}, '
     '"build_config": {"plugin_config": {"use_paged_context_fmha": "maybe"}}}', "use_paged_context_fmha must be"),
])
def test_bad_config_is_one_line_usage_error_naming_the_file(tmp_path, content, fragment):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(UsageError) as err:
        load_engine_config(tmp_path)
    msg = str(err.value)
    assert fragment in msg and "config.json" in msg and "\n" not in msg
