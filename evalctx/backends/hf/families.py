"""Small random-weight models of the families people evaluate at long context, built offline from each family's
own transformers config class with the embedded tiny tokenizer: what ``evalctx conformance --family`` checks the
hf engine against.

Every family keeps what makes it differ from plain Llama (its RoPE scaling, windows, soft-capping, sinks, latent
attention, experts, NoPE layers) and scales its thresholds down to :data:`THRESHOLD` tokens, so prompts of a few
hundred tokens fall on both sides of each. Weights are drawn with a large ``initializer_range`` so the logits are
peaky and greedy answers are not near-ties: a token that differs is a computation that differs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THRESHOLD = 128
"""Sliding windows, attention chunks and original RoPE windows of the built models, in tokens."""
LENGTHS = (100, 300)
"""Prompt lengths that fall below and above every threshold (300 is past two of them)."""

_BASE: dict[str, Any] = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1,
                             eos_token_id=2, pad_token_id=3, initializer_range=0.2, tie_word_embeddings=False)


@dataclass(frozen=True)
class Family:
    """One family: the config class and the model class transformers has for it, and what the build keeps."""

    name: str
    config_class: str
    model_class: str
    covers: str
    """What of the family the model has (the options the comparison covers)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Overrides of :data:`_BASE` for this family."""


T = THRESHOLD
FAMILIES: tuple[Family, ...] = (
    Family("llama", "LlamaConfig", "LlamaForCausalLM", "plain RoPE, grouped-query attention"),
    Family("llama3.1", "LlamaConfig", "LlamaForCausalLM", "llama3 RoPE scaling (factor 8 over an original window)",
           dict(max_position_embeddings=8 * T, rope_parameters=dict(
               rope_type="llama3", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=T,
               low_freq_factor=1.0, high_freq_factor=4.0))),
    Family("dynamic-ntk", "LlamaConfig", "LlamaForCausalLM", "dynamic NTK RoPE (factor 4): frequencies follow "
           "the sequence length", dict(max_position_embeddings=T, rope_parameters=dict(
               rope_type="dynamic", rope_theta=10000.0, factor=4.0))),
    Family("phi3-longrope", "Phi3Config", "Phi3ForCausalLM", "LongRoPE: short factors up to the original window, "
           "long ones past it (Phi-3/3.5/4-mini)", dict(
               max_position_embeddings=4 * T, original_max_position_embeddings=T, rope_parameters=dict(
                   rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + 0.1 * i for i in range(8)],
                   long_factor=[1.0 + i for i in range(8)], original_max_position_embeddings=T))),
    Family("qwen2.5-yarn", "Qwen2Config", "Qwen2ForCausalLM", "YaRN (factor 4 over the original window)", dict(
        max_position_embeddings=T, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                        original_max_position_embeddings=T))),
    Family("mistral", "MistralConfig", "MistralForCausalLM", "sliding window in every layer",
           dict(sliding_window=T, max_position_embeddings=16 * T)),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "attention and final soft-capping, sliding/global layers "
           "alternating, eager attention", dict(sliding_window=T, max_position_embeddings=16 * T)),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "2 sliding : 1 global layers, two RoPE bases, "
           "linear scaling on global layers, q/k norms", dict(
               sliding_window=T, max_position_embeddings=16 * T, num_hidden_layers=3,
               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
               rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                "full_attention": dict(rope_type="linear", rope_theta=1e6, factor=8.0)})),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "q/k RMS norms", dict(max_position_embeddings=16 * T)),
    Family("gpt-oss", "GptOssConfig", "GptOssForCausalLM", "attention sinks, sliding/full layers alternating, "
           "YaRN, mixture of experts", dict(
               sliding_window=T, max_position_embeddings=4 * T, num_local_experts=4, num_experts_per_tok=2,
               rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                                    beta_slow=1.0, truncate=False, original_max_position_embeddings=T))),
    Family("deepseek-v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", "multi-head latent attention (key width 24, "
           "value width 32), interleaved YaRN, mixture of experts", dict(
               num_key_value_heads=4, head_dim=8, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
               qk_nope_head_dim=16, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
               first_k_dense_replace=1, moe_intermediate_size=32, n_group=1, topk_group=1,
               max_position_embeddings=4 * T, rope_parameters=dict(
                   rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=T,
                   beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))),
    Family("cohere2", "Cohere2Config", "Cohere2ForCausalLM", "sliding layers with RoPE, a global layer without "
           "(NoPE)", dict(sliding_window=T, max_position_embeddings=16 * T, num_hidden_layers=2,
                          layer_types=["sliding_attention", "full_attention"])),
    Family("llama4", "Llama4TextConfig", "Llama4ForCausalLM", "chunked attention (chunks of the threshold), NoPE "
           "layers with attention temperature tuning, mixture of experts", dict(
               max_position_embeddings=16 * T, attention_chunk_size=T, floor_scale=64, num_hidden_layers=2,
               no_rope_layers=[1, 0], layer_types=["chunked_attention", "full_attention"], num_local_experts=2,
               num_experts_per_tok=1, intermediate_size_mlp=128, interleave_moe_layer_step=1)),
    Family("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", "NoPE in every other layer",
           dict(max_position_embeddings=16 * T, no_rope_layers=[1, 0])),
    Family("olmo3", "Olmo3Config", "Olmo3ForCausalLM", "sliding and full layers, q/k norms after projection",
           dict(sliding_window=T, max_position_embeddings=16 * T,
                layer_types=["sliding_attention", "full_attention"])),
    Family("mixtral", "MixtralConfig", "MixtralForCausalLM", "mixture of experts (2 of 4)",
           dict(max_position_embeddings=16 * T, num_local_experts=4, num_experts_per_tok=2)),
)


def by_name(name: str) -> Family:
    """The family called ``name``; ValueError listing the known names otherwise."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def build(family: Family, dest: Path, seed: int = 0) -> Path:
    """Write a random-weight float32 model of ``family`` with the embedded tiny tokenizer to ``dest``; returns it.
    Raises whatever transformers raises for a config its version does not know."""
    import torch
    import transformers

    from evalctx.models.embedded import resolve_model

    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars: noise in a matrix's output
    torch.manual_seed(seed)
    config = getattr(transformers, family.config_class)(**{**_BASE, **family.config})
    model = getattr(transformers, family.model_class)(config).to(torch.float32)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tiny = resolve_model("tiny").path
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, dest / name)
    return dest
