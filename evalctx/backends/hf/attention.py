"""The lower-right causal SDPA (``attn_implementation="evalctx_sdpa"``) and the choice of attention per model.

With a KV cache, a prefill chunk of c queries attends to all k keys so far: causal alignment is lower-right.
Stock "sdpa" builds a boolean (c x k) mask for that, which at 1M tokens costs gigabytes and keeps SDPA off its
fast kernels. Grouped-query attention goes to the kernels as it is: they share each KV head across its query heads
without the copy that ``repeat_interleave`` would make of the whole cache on every chunk and decode step.

On CUDA the chunk's attention is split where the kernels are fastest (measured on H200, torch 2.11: PyTorch's
flash-attention 2 kernel, which ``causal_lower_right`` reaches, ran a 128K prefill's attention at ~58% of the
rate cuDNN's Hopper kernel reaches on causal SDPA):

* the chunk against its own keys: a square causal block (upper-left = lower-right), on cuDNN;
* the chunk against all earlier keys: no mask, on cuDNN, in blocks of 2^j x 1024 keys (the binary digits of the
  prefix length) so that the few shapes repeat: cuDNN builds an execution plan per shape, which cost tens of
  milliseconds each time a new length came (every decode step paid it: ~40 ms/token on 4 layers);
* the partial results merged exactly through their log-sum-exp (the flash-decoding / cascade-attention merge);
* decode (one query) on the flash kernel, whose split-KV path reads long caches at memory speed with no plan.

That path is checked once per head layout against a float32 reference (:func:`cuda_path_ok`); where cuDNN is
missing or disagrees, the chunk goes to ``causal_lower_right`` (flash) as a whole.
"""

from __future__ import annotations

import sys
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

    unsupported = [k for k in ("sliding_window", "softcap", "s_aux") if kwargs.get(k) is not None]
    if unsupported:  # a model outside _PLAIN_CAUSAL asked for it by name: never compute something else silently
        raise ValueError(f"attn_implementation={LOWER_RIGHT_SDPA} computes plain causal attention, but this model "
                         f"passes {', '.join(unsupported)}: use attn_implementation=auto")
    if query.is_cuda and cuda_path_ok(query, key):
        return split_attention(query, key, value, scaling).transpose(1, 2).contiguous(), None
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


BLOCK_UNIT = 1024
"""Earlier keys go to cuDNN in blocks of 2^j x this many keys (plus one remainder block)."""


def prefix_blocks(n: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering keys ``0..n``: the binary digits of ``n // BLOCK_UNIT`` largest first,
    then the remainder. ``prefix_blocks(11 * 1024 + 5)`` is 8K, 2K, 1K blocks and a 5-key one."""
    out, start = [], 0
    units = n // BLOCK_UNIT
    for bit in range(units.bit_length() - 1, -1, -1):
        if units >> bit & 1:
            out.append((start, start + (BLOCK_UNIT << bit)))
            start += BLOCK_UNIT << bit
    if start < n:
        out.append((start, n))
    return out


def _cudnn(query: Any, key: Any, value: Any, causal: bool, scale: float | None) -> tuple[Any, Any]:
    """cuDNN SDPA with its log-sum-exp: (batch, heads, q, head_dim) output, (batch, heads, q) float32 LSE."""
    import torch

    res = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, causal, False,
                                                            scale=scale)
    return res[0], res[1].reshape(query.shape[:3])


def _flash(query: Any, key: Any, value: Any, scale: float | None) -> Any:
    """PyTorch's flash kernel without a mask (split-KV for a single query)."""
    import torch

    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, False, False, scale=scale)[0]


def split_attention(query: Any, key: Any, value: Any, scale: float | None) -> Any:
    """Lower-right causal attention of ``query`` (batch, heads, q, d) against ``key``/``value`` (batch, kv_heads,
    k >= q, d) on CUDA, as the module docstring describes; returns (batch, heads, q, d)."""
    import torch

    q_len, k_len = query.shape[-2], key.shape[-2]
    if q_len == 1:
        return _flash(query, key, value, scale)
    past = k_len - q_len
    out, lse = _cudnn(query, key[:, :, past:], value[:, :, past:], True, scale)
    if past == 0:
        return out
    acc = out.float()
    for start, stop in prefix_blocks(past):
        o, lse_b = _cudnn(query, key[:, :, start:stop], value[:, :, start:stop], False, scale)
        new = torch.logaddexp(lse, lse_b)
        acc.mul_(torch.exp(lse - new).unsqueeze(-1)).add_(o.float().mul_(torch.exp(lse_b - new).unsqueeze(-1)))
        lse = new
    return acc.to(query.dtype)


_CHECKED: dict[tuple, bool] = {}


def cuda_path_ok(query: Any, key: Any) -> bool:
    """Whether :func:`split_attention` matches a float32 reference for this head layout, dtype and device, and for
    one sequence or a batch (checked once each, on random data laid out as the model's: transposed queries, keys
    viewed from a larger position-major buffer, a prefix with power-of-two blocks and a remainder, and one decode
    query). A batch is checked apart because position-major keys of several sequences have a batch stride below
    the position stride, a layout one sequence never shows the kernels."""
    import torch

    sig = (query.device, query.dtype, query.shape[1], key.shape[1], query.shape[-1], query.shape[0] > 1)
    if sig in _CHECKED:
        return _CHECKED[sig]
    heads, kv_heads, dim, batch = sig[2], sig[3], sig[4], 2 if sig[5] else 1
    gen = torch.Generator(device=query.device).manual_seed(0)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen, device=query.device, dtype=torch.float32).to(query.dtype)

    ok, why = True, ""
    for q_len, k_len in ((1, 3000), (200, 200), (200, 200 + 3 * BLOCK_UNIT + 500)):
        q = rand(batch, q_len, heads, dim).transpose(1, 2)
        # keys and values as the preallocated cache hands them out: position-major storage, permuted
        k = rand(k_len + 64, batch, kv_heads, dim)[:k_len].permute(1, 2, 0, 3)
        v = rand(k_len + 64, batch, kv_heads, dim)[:k_len].permute(1, 2, 0, 3)
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(heads // kv_heads, 1),
            v.float().repeat_interleave(heads // kv_heads, 1), attn_mask=mask)
        try:
            got = split_attention(q, k, v, None).float()
        except RuntimeError as exc:
            ok, why = False, str(exc).splitlines()[0][:200]
            break
        err = float((got - ref).norm() / ref.norm())
        if not err < 2e-2:
            ok, why = False, f"relative error {err:.2g} at {batch} x {q_len} queries x {k_len} keys"
            break
    if not ok:
        print(f"evalctx: the cuDNN attention path failed its check ({why}); using the flash kernel",
              file=sys.stderr)
    _CHECKED[sig] = ok
    return ok


def cuda_kernels() -> str | None:
    """Which CUDA kernels the lower-right SDPA used in this process (for the manifest); None before any use."""
    if not _CHECKED:
        return None
    if all(_CHECKED.values()):
        return "cuDNN (prefill, key blocks merged by log-sum-exp) + flash (decode)"
    return "flash (causal_lower_right): the cuDNN path failed its check"


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
    return (getattr(cfg, "model_type", None) in _PLAIN_CAUSAL and not sliding
            and all(t == "full_attention" for t in layer_types))


def model_class(cfg: Any) -> Any:
    """The transformers causal-LM class of a config (``cfg.model_type``), or None when transformers has none."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(getattr(cfg, "model_type", "")))
    if isinstance(name, (list, tuple)):
        name = name[0]
    return getattr(transformers, name, None) if isinstance(name, str) else None


def default_attention(cfg: Any) -> str:
    """The attention transformers itself gives this model when none is asked for: "sdpa" where the model class
    supports it, else "eager" (Gemma 2's soft-capping, gpt-oss's sinks). Soft-capping in a config whose class
    otherwise takes sdpa (Gemma 3) is "eager" too: sdpa refuses it at the first forward."""
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return "eager"
    cls = model_class(cfg) if cfg is not None else None
    return "eager" if cls is not None and not getattr(cls, "_supports_sdpa", True) else "sdpa"


def auto_attention(cfg: Any, on_cuda: bool) -> str:
    """The lower-right SDPA on CUDA for plain causal models; elsewhere what transformers picks for the model
    (:func:`default_attention`; on CPU the lower-right SDPA gains nothing: the default CPU run took 140 s with it
    and 126 s without). ``cfg`` is the model's transformers config, or None when it could not be read (the model
    load reports the real problem)."""
    if on_cuda and cfg is not None and plain_causal(cfg):
        return LOWER_RIGHT_SDPA
    return default_attention(cfg)
