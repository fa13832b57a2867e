"""The lower-right causal SDPA (``attn_implementation="evalctx_sdpa"``) and the choice of attention per model.

With a KV cache, a prefill chunk of c queries attends to all k keys so far: causal alignment is lower-right.
Stock "sdpa" builds a boolean (c x k) mask for that, which at 1M tokens costs gigabytes and keeps SDPA off its
flash kernel; ``causal_lower_right(c, k)`` states the same causality without a tensor, and PyTorch then calls the
flash kernel with ``is_causal=True`` (lower-right in flash-attention's convention). Grouped-query attention goes
to SDPA as it is (``enable_gqa``): the kernel shares each KV head across its query heads without the copy that
``repeat_interleave`` would make of the whole cache on every chunk and decode step.
"""

from __future__ import annotations

from typing import Any

LOWER_RIGHT_SDPA = "evalctx_sdpa"

# Architectures whose attention is plain causal softmax attention (no soft-capping, sinks or ALiBi), so the
# lower-right SDPA computes exactly what their own attention would.
_PLAIN_CAUSAL = {"llama", "mistral", "qwen2", "qwen3", "granite", "olmo", "olmo2", "phi3", "smollm3"}


def lower_right_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention interface: ``query`` (batch, heads, q, head_dim), ``key``/``value`` (batch, kv_heads,
    k, head_dim) with k >= q the keys so far; returns (batch, q, heads, head_dim). Valid for causal models without
    padding or sliding windows, which is what this backend feeds (equal-length batches)."""
    import torch
    from torch.nn.attention.bias import causal_lower_right

    sdpa = torch.nn.functional.scaled_dot_product_attention
    q_len, k_len = query.shape[-2], key.shape[-2]
    gqa = key.shape[1] != query.shape[1]
    if q_len == 1:  # decode: the one query sees every key
        out = sdpa(query, key, value, scale=scaling, enable_gqa=gqa)
    elif q_len == k_len:
        out = sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        out = sdpa(query, key, value, attn_mask=causal_lower_right(q_len, k_len), scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def register_lower_right_sdpa() -> None:
    """Register ``attn_implementation="evalctx_sdpa"`` with transformers (attention, and a mask builder that
    builds nothing)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def no_mask(*args: Any, **kwargs: Any) -> None:
        return None

    AttentionInterface.register(LOWER_RIGHT_SDPA, lower_right_sdpa)
    AttentionMaskInterface.register(LOWER_RIGHT_SDPA, no_mask)


def plain_causal(cfg: Any) -> bool:
    """Whether a transformers config describes plain full causal attention (no sliding window, no other kinds)."""
    sliding = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    layer_types = getattr(cfg, "layer_types", None) or []
    return cfg.model_type in _PLAIN_CAUSAL and not sliding and all(t == "full_attention" for t in layer_types)


def auto_attention(cfg: Any, on_cuda: bool) -> str:
    """The lower-right SDPA on CUDA for plain causal models; stock sdpa elsewhere (on CPU its gain is nil: the
    default CPU run took 140 s with it and 126 s without). ``cfg`` is the model's transformers config, or None
    when it could not be read (the model load reports the real problem)."""
    if on_cuda and cfg is not None and plain_causal(cfg):
        return LOWER_RIGHT_SDPA
    return "sdpa"
