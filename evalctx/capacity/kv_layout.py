"""What the KV cache holds per decoder layer, and what a token of it costs: one arithmetic for the hf backend's
cache (:mod:`evalctx.backends.hf.cache`), its memory preflight and ``evalctx plan --backend hf``, so that what the
planner prints is what the backend allocates.

Layers come in three kinds, read from the model config as transformers reads it
(``transformers.cache_utils.get_layer_types_and_kwargs``, 5.x):

* **full** attention: every earlier position is attended, so the cache holds the whole sequence;
* **sliding** attention with window W (``sliding_window``; Mistral, Gemma 2/3, gpt-oss, Cohere 2, OLMo 3): a query
  at position p attends positions p-W+1..p (transformers' ``sliding_window_overlay``);
* **chunked** attention with chunks of W (``attention_chunk_size``; Llama 4): a query attends the positions of its
  own chunk of W, at most W-1 earlier ones.

A sliding or chunked layer needs only the W-1 positions before a prefill chunk plus the chunk itself, so the cache
keeps ``W - 1 + step`` positions for it (``step``: the prefill chunk, the longest query), as a ring the layer
compacts when it fills. With prefix reuse it also keeps, at every prefill-chunk boundary, the W-1 positions before
it (a later prompt may share the prefix up to any boundary). Where that would be no smaller than the sequence the
layer keeps it whole.

KV precision (``kv_dtype``): the model dtype (fp32, bf16, fp16); fp8 (e4m3) and int8 with one float32 scale per
token and KV head (the head vector's absolute maximum over the format's largest value: 448 for e4m3, 127 for
int8), finer than the engines' schemes, so its cost is a lower bound of theirs; or ``fp8_tensor``: e4m3 with one
scale of 1 per tensor, what vLLM does without calibrated scales (TensorRT-LLM, and vLLM with a quantized
checkpoint, use calibrated per-tensor scales, which evalctx cannot reproduce without the calibration).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

QUANTIZED_KV = ("fp8", "int8", "fp8_tensor")
"""KV formats stored in 8 bits; all but fp8_tensor with per-token, per-head scales."""
SCALED_KV = ("fp8", "int8")
SCALE_BYTES = 4
"""One float32 scale per token and KV head, for K and for V."""
_ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "fp8_tensor": 1}
_SHARED_KV = ("kv_sharing_modes", "num_kv_shared_layers")


def layer_windows(cfg: Mapping[str, Any]) -> tuple[int | None, ...] | None:
    """Per decoder layer, the attention window in positions: None for full attention, W for a sliding window of W
    positions (the query's own included) or attention chunks of W. ``cfg`` is a Hugging Face config as a dict
    (``config.to_dict()``; a multimodal wrapper's ``text_config`` is used). Follows transformers'
    ``get_layer_types_and_kwargs``: ``layer_types`` when given, else ``sliding_window`` or ``attention_chunk_size``
    for every layer. Returns None when the layout is not one this arithmetic describes (layers that share another
    layer's KV, recurrent or other layer kinds): such models keep every layer whole."""
    c = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else cfg
    n = c.get("num_hidden_layers")
    if not isinstance(n, int) or n < 1 or any(c.get(k) for k in _SHARED_KV):
        return None
    sliding = c.get("sliding_window") if c.get("use_sliding_window", True) is not False else None
    chunk = c.get("attention_chunk_size")
    types = c.get("layer_types")
    if types is None:
        types = ["sliding_attention" if sliding is not None else
                 "chunked_attention" if chunk is not None else "full_attention"] * n
    if not isinstance(types, (list, tuple)) or len(types) != n:
        return None
    out: list[int | None] = []
    for kind in types:
        window = {"full_attention": None, "sliding_attention": sliding, "chunked_attention": chunk}.get(kind, -1)
        if kind == "full_attention":
            out.append(None)
        elif isinstance(window, int) and not isinstance(window, bool) and window >= 1:
            out.append(window)
        else:  # another kind of layer, or a window the config does not give: not described here
            return None
    return tuple(out)


def window_positions(window: int | None, tokens: int, *, step: int, reuse_every: int = 0) -> int:
    """Positions per sequence one layer's cache holds for ``tokens`` positions (prompt plus budget): ``tokens``
    for a full layer; for a window of W, ``W - 1 + step`` (``step``: the longest query, the prefill chunk; 0 = the
    whole prompt at once) plus, with prefix reuse every ``reuse_every`` positions, W - 1 per boundary; never more
    than ``tokens``."""
    if window is None or step <= 0:
        return tokens
    keep = window - 1
    held = keep + step + (keep * ((tokens - 1) // reuse_every) if reuse_every > 0 else 0)
    return min(held, tokens)


def element_bytes(kv_dtype: str) -> int:
    """Bytes per stored element (the scales apart): fp32 4, bf16/fp16 2, fp8/int8 1. KeyError for another."""
    return _ELEMENT_BYTES[kv_dtype]


def bytes_per_position(kv_heads: int, head_dim: int, kv_dtype: str) -> int:
    """K and V bytes one position costs in one layer for ``kv_heads`` heads (this rank's), scales included."""
    scale = SCALE_BYTES if kv_dtype in SCALED_KV else 0
    return kv_heads * (2 * head_dim * element_bytes(kv_dtype) + 2 * scale)


@dataclass(frozen=True)
class LayerGroup:
    """Layers of one kind and window: how many, the positions each holds, and their bytes (one rank, whole batch)."""

    window: int | None
    layers: int
    positions: int
    bytes: int

    @property
    def kind(self) -> str:
        return "full" if self.window is None else f"window {self.window}"


def kv_groups(windows: Sequence[int | None], tokens: int, *, kv_heads: int, head_dim: int, kv_dtype: str,
              step: int, reuse_every: int = 0, batch: int = 1) -> list[LayerGroup]:
    """The KV cache of one rank by layer kind: full layers first, then each window, largest first."""
    per_pos = bytes_per_position(kv_heads, head_dim, kv_dtype)
    counts: dict[int | None, int] = {}
    for w in windows:
        counts[w] = counts.get(w, 0) + 1
    order = sorted(counts, key=lambda w: -math.inf if w is None else -w)
    out = []
    for w in order:
        held = window_positions(w, tokens, step=step, reuse_every=reuse_every)
        out.append(LayerGroup(w, counts[w], held, counts[w] * held * per_pos * batch))
    return out
