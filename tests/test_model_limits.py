"""Engine-agnostic model limits: sliding windows and absolute positions make prompts unsupported; RoPE beyond the
stated window runs, flagged (issue 10, kind 5). The hf backend end to end is in test_hf_checks.py."""

from __future__ import annotations

import pytest

from evalctx.capacity.preflight import EngineLimits, check, limits_from_hf_config, window_flags


def test_a_window_of_256_refuses_a_900_token_prompt():
    """The issue's example: it passed preflight silently."""
    reason = check(900, 6, EngineLimits(attention_window=256))
    assert reason is not None and "\n" not in reason
    assert "attention sees only the last 256 tokens" in reason and "drop lengths > 250" in reason
    assert check(250, 6, EngineLimits(attention_window=256)) is None
    assert check(251, 6, EngineLimits(attention_window=256)) is not None
    with_sinks = check(900, 6, EngineLimits(attention_window=256, sink_tokens=4))
    assert "first 4 (sink tokens)" in with_sinks


def test_absolute_positions_end_where_the_table_ends():
    limits = EngineLimits(max_positions=1024)
    assert check(1018, 6, limits) is None
    reason = check(1019, 6, limits)
    assert "1024 learned absolute positions" in reason and "drop lengths > 1018" in reason


def test_engine_limits_come_first():
    # max_seq_len is the engine's own; the model's window is checked as well, never instead
    assert "max_seq_len" in check(2000, 6, EngineLimits(max_seq_len=1024, attention_window=256))


@pytest.mark.parametrize("config,window,absolute,trained", [
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768}, 4096, None, 32768),
    ({"model_type": "mistral", "sliding_window": None, "max_position_embeddings": 32768}, None, None, 32768),
    ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False,
      "max_position_embeddings": 32768}, None, None, 32768),
    # one full-attention layer sees the whole prompt (Gemma 2 alternates; Qwen2 below max_window_layers)
    ({"model_type": "gemma2", "sliding_window": 4096, "layer_types": ["sliding_attention", "full_attention"],
      "max_position_embeddings": 8192}, None, None, 8192),
    ({"model_type": "qwen2", "sliding_window": 256, "use_sliding_window": True,
      "layer_types": ["sliding_attention", "sliding_attention"], "max_position_embeddings": 4096}, 256, None, 4096),
    ({"model_type": "gpt2", "n_positions": 1024}, None, 1024, None),
    ({"model_type": "opt", "max_position_embeddings": 2048}, None, 2048, None),
    ({"model_type": "llama", "max_position_embeddings": 131072,
      "rope_scaling": {"rope_type": "llama3", "original_max_position_embeddings": 8192}}, None, None, 131072),
    ({"model_type": "bloom"}, None, None, None),
    ({"model_type": "llava", "text_config": {"model_type": "mistral", "sliding_window": 4096,
                                             "max_position_embeddings": 32768}}, 4096, None, 32768),
])
def test_limits_from_hf_configs(config, window, absolute, trained):
    lim = limits_from_hf_config(config)
    assert (lim.attention_window, lim.max_positions, lim.trained_positions) == (window, absolute, trained)


def test_beyond_the_stated_window_is_a_flag_not_a_refusal():
    lim = EngineLimits(trained_positions=512)
    assert check(4000, 6, lim) is None
    assert window_flags(506, 6, lim) == [] and window_flags(507, 6, lim) == ["beyond_trained_window"]
    assert window_flags(10**6, 6, None) == [] and window_flags(10**6, 6, EngineLimits()) == []


def test_engine_limits_carry_the_window_and_the_stated_positions():
    from pathlib import Path

    from evalctx.capacity.engine_config import load_engine_config
    from evalctx.capacity.preflight import limits_from_engine

    engine = load_engine_config(Path(__file__).parent / "data" / "engines" / "v1")
    lim = limits_from_engine(engine, max_input_len=None, chunked_context=True, kv_cache_tokens=None,
                             attention_window=4096, sink_tokens=4)
    assert (lim.attention_window, lim.sink_tokens) == (4096, 4)
    assert lim.trained_positions == engine.max_position_embeddings
    assert "attention sees only the last 4096 tokens" in check(5000, 8, lim)


@pytest.mark.parametrize("kind,absolute,trained", [("rope_gpt_neox", None, 1024), ("learned_absolute", 1024, None),
                                                   ("alibi", None, None), (None, None, 1024)])
def test_an_engines_position_embedding_type_decides_refuse_or_flag(tmp_path, kind, absolute, trained):
    """The engine config states how positions work (pretrained_config.position_embedding_type): a GPT-2 engine's
    learned positions end at max_position_embeddings (prompts beyond are unsupported, as for the hf backend),
    an ALiBi engine states no window to flag, a RoPE engine flags rows beyond it."""
    import json
    from pathlib import Path

    from evalctx.capacity.engine_config import load_engine_config
    from evalctx.capacity.preflight import limits_from_engine

    data = json.loads((Path(__file__).parent / "data" / "engines" / "v1" / "config.json").read_text())
    data["pretrained_config"]["max_position_embeddings"] = 1024
    if kind is None:
        del data["pretrained_config"]["position_embedding_type"]
    else:
        data["pretrained_config"]["position_embedding_type"] = kind
    (tmp_path / "config.json").write_text(json.dumps(data))
    engine = load_engine_config(tmp_path)
    lim = limits_from_engine(engine, max_input_len=None, chunked_context=True, kv_cache_tokens=None)
    assert (lim.max_positions, lim.trained_positions) == (absolute, trained)
    assert (check(2000, 6, lim) is not None) == (absolute is not None)


@pytest.mark.parametrize("config, stated", [
    # YaRN: the original window times the factor (Qwen2.5: 4 x 32768), whatever max_position_embeddings says
    ({"model_type": "qwen2", "max_position_embeddings": 32768,
      "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}, 131072),
    ({"model_type": "deepseek_v3", "max_position_embeddings": 163840,
      "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}}, 163840),
    # the example: factor 4 over 1024 states 4096
    ({"model_type": "llama", "max_position_embeddings": 1024,
      "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}, 4096),
    # linear and dynamic NTK scale max_position_embeddings (vLLM)
    ({"model_type": "llama", "max_position_embeddings": 1024,
      "rope_parameters": {"rope_type": "dynamic", "factor": 4.0}}, 4096),
    ({"model_type": "llama", "max_position_embeddings": 2048, "rope_scaling": {"type": "linear", "factor": 2}},
     4096),
    # LongRoPE and llama3 state the extended window already; Gemma 3's is already scaled
    ({"model_type": "phi3", "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
      "rope_parameters": {"rope_type": "longrope", "short_factor": [1], "long_factor": [2]}}, 131072),
    ({"model_type": "llama", "max_position_embeddings": 131072,
      "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}}, 131072),
    ({"model_type": "gemma3_text", "max_position_embeddings": 131072,
      "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0},
                          "sliding_attention": {"rope_type": "default"}}}, 131072),
    # one set per layer type (transformers 5): the scaled set decides
    ({"model_type": "olmo3", "max_position_embeddings": 8192,
      "rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 8.0,
                                             "original_max_position_embeddings": 8192},
                          "sliding_attention": {"rope_type": "default"}}}, 65536),
    ({"model_type": "llama", "max_position_embeddings": 8192}, 8192),
])
def test_the_stated_window_is_derived_as_vllm_derives_it(config, stated):
    assert limits_from_hf_config(config).trained_positions == stated


def test_plan_warns_past_the_scaled_window_not_past_max_position_embeddings(tmp_path, capsys):
    import json

    from evalctx.cli import main

    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1024,
           "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 2048,
           "vocab_size": 1000, "max_position_embeddings": 32768,
           "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    base = ["plan", "--backend", "hf", "--config", str(tmp_path / "config.json"), "--gpu-memory", "80"]
    assert main(base + ["--context", "65536"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(base + ["--context", "200000"]) == 0
    assert "exceeds the model's stated window (max_position_embeddings 32,768, RoPE-scaled) 131,072" in \
        capsys.readouterr().err
