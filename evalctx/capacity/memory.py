"""Memory per GPU of one rank of a tensor-parallel replica running chunked prefill: weights + KV cache + activations.

The arithmetic is engine-agnostic (a :class:`~evalctx.capacity.plan.ModelShape`, a dtype, tp, a chunk and the tokens the
cache must hold in, bytes out); what differs between engines is which buffers stay live while one chunk runs,
passed as :class:`Activations`. The hf backend's preflight and ``evalctx plan --backend hf`` call it, so what the
planner prints is what the backend decides. (The TensorRT-LLM activation model still lives in
:func:`evalctx.capacity.plan.activation_bytes`; ``plan()`` keeps its ``kv_cache_free_gpu_memory_fraction`` logic.)

Per rank, for a batch of ``b`` sequences of ``tokens`` positions (prompt plus generation budget), tp ``K``:

* **weights**: the attention and MLP matrices split over K (transformers' tp plan for Llama-style models:
  q/k/v/gate/up column-wise, o/down row-wise); the embedding table and norms replicated on every rank; lm_head
  split column-wise (its output is gathered). Same layout as :func:`evalctx.capacity.plan.rank_memory` at pp=1.
* **KV cache**: preallocated for ``b x tokens`` positions, ``2 x layers x ceil(kv_heads/K) x head_dim`` elements each,
  in full-attention layers; sliding-window and chunked layers hold their window (:mod:`evalctx.capacity.kv_layout`, which
  also gives the bytes of fp8/int8 elements and their scales). A quantized cache is read back one layer at a time
  in the model dtype, through float32 where scaled: ``2 x b x tokens x ceil(kv_heads/K) x head_dim x (a + 4)``
  bytes more at the peak (``a`` alone for fp8_tensor).
* **activations** of one prefill chunk of ``c`` tokens (hf transformers, eager modules, bf16/fp16 ``a`` bytes):
  the largest of the MLP (``3 x c x intermediate/K`` for act(gate), up and their product, plus the residual and
  normed input ``2 x c x hidden``), attention (q, its RoPE temporaries and the output, ``6 x c x heads/K x
  head_dim``, plus k/v with RoPE, ``4 x c x kv_heads/K x head_dim``, plus ``10 x c x heads/K x head_dim`` bytes
  for the float32 merge of attention blocks) and RMSNorm's fp32 upcast (``3 x c x hidden x 4`` bytes); plus the
  last position's logits (``b x vocab x 4``). Measured on H200s (Llama-3-8B shape, chunk 8192, 32K to 1M
  tokens, tp 1 and 2, 4 and 32 layers), torch's peak was 0.07-0.12 GiB above weights + KV + these
  activations; the reserve covers that. The lower-right SDPA builds no mask; stock
  "sdpa" materialises a ``c x context`` mask (counted as ``c x tokens x (1 + a)`` bytes), and "eager" the scores
  (``c x tokens x heads/K x 4`` bytes, twice).
* **reserve**: CUDA context, cuBLAS/NCCL workspaces and allocator slack, which torch's allocator does not count.

GB here means 10^9 bytes, as in ``evalctx plan``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from evalctx.capacity.dtypes import canonical_dtype
from evalctx.capacity.kv_layout import QUANTIZED_KV, SCALED_KV, kv_groups
from evalctx.capacity.plan import GB, KV_DTYPES, ModelShape, rank_memory

DEFAULT_RESERVE_GB = 2.0
"""CUDA context (~0.5 GB), cuBLAS and NCCL workspaces, and allocator fragmentation."""


@dataclass(frozen=True)
class HFMemory:
    """Bytes one rank needs for one batch; compare :attr:`total` with the GPU's memory."""

    tp: int
    tokens: int
    """Positions per sequence the KV cache holds: prompt plus generation budget."""
    batch: int
    chunk: int
    """Prefill chunk in tokens (the prompt length when it is shorter)."""
    weights: int
    kv_cache: int
    activations: int
    reserve: int
    kv_dtype: str = "bf16"
    kv_groups: tuple = ()
    """The KV cache by layer kind (:class:`evalctx.capacity.kv_layout.LayerGroup`), full layers first."""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.reserve

    def fits(self, capacity_bytes: float) -> bool:
        return self.total <= capacity_bytes

    def breakdown(self) -> str:
        """``"151.3 GB per GPU (weights 16.1 + KV cache 128.8 + activations 4.4 + reserve 2.0)"``."""
        return (f"{self.total / GB:.1f} GB per GPU (weights {self.weights / GB:.1f} + KV cache "
                f"{self.kv_cache / GB:.1f} + activations {self.activations / GB:.1f} + reserve "
                f"{self.reserve / GB:.1f})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kv_groups"] = [{**asdict(g), "kind": g.kind} for g in self.kv_groups]
        return {**d, "total": self.total}

    def layout_text(self) -> str:
        """``"full: 4 layers x 131,072 positions; window 512: 20 layers x 4,607 positions (fp8)"``."""
        parts = [f"{g.kind}: {g.layers} layers x {g.positions:,} positions" for g in self.kv_groups]
        return "; ".join(parts) + f" ({self.kv_dtype})"


def hf_activation_bytes(shape: ModelShape, chunk: int, tokens: int, *, batch: int = 1, tp: int = 1,
                        act_bytes: float = 2.0, attention: str = "evalctx_sdpa") -> int:
    """Peak live activations of one prefill chunk on one rank (see the module docstring for the terms)."""
    c, h, a = batch * chunk, shape.hidden_size, act_bytes
    q = shape.num_attention_heads / tp * shape.head_dim
    kv = math.ceil(shape.num_kv_heads / tp) * shape.head_dim
    mlp = a * (2 * c * h + 3 * c * shape.intermediate_size / tp)
    attn = a * (2 * c * h + 6 * c * q + 4 * c * kv) + 10 * c * q  # + the CUDA path's fp32 merge buffers
    norm = a * 2 * c * h + 4 * 3 * c * h
    extra = 0.0
    if attention == "sdpa":
        extra = c * tokens * (1 + a)
    elif attention == "eager":
        extra = 2 * c * tokens * shape.num_attention_heads / tp * 4
    logits = batch * shape.vocab_size * 4
    return int(max(mlp, attn, norm) + extra + logits)


def hf_rank_memory(shape: ModelShape, tokens: int, *, chunk: int, batch: int = 1, tp: int = 1,
                   dtype: str = "bf16", attention: str = "evalctx_sdpa",
                   reserve_gb: float = DEFAULT_RESERVE_GB, kv_dtype: str | None = None,
                   windows: Sequence[int | None] | None = None, reuse_every: int = 0) -> HFMemory:
    """Memory one rank of an hf replica needs for ``batch`` sequences of ``tokens`` positions.

    ``chunk`` 0 means the whole prompt in one step; a chunk longer than ``tokens`` is cut to it. ``dtype`` is the
    weights' (fp32, fp16, bf16); ``kv_dtype`` the KV cache's (default: ``dtype``; or fp8, int8). ``windows``: per
    layer None or its attention window (:func:`evalctx.capacity.kv_layout.layer_windows`; default: every layer full);
    ``reuse_every``: the prefix-reuse granularity (0 = none). Raises :class:`~evalctx.errors.UsageError` for an
    unknown dtype.
    """
    step = min(chunk or tokens, tokens)
    if kv_dtype != "fp8_tensor":
        kv_dtype = canonical_dtype(kv_dtype or dtype, KV_DTYPES, "KV-cache dtype")
    base = rank_memory(shape, tp=tp, pp=1, weight_dtype=dtype, kv_dtype=dtype, kv_tokens=tokens * batch,
                       max_num_tokens=max(1, step), batch=batch)
    a = 4.0 if dtype == "fp32" else 2.0
    heads = math.ceil(shape.num_kv_heads / tp)
    groups = tuple(kv_groups(windows or [None] * shape.num_layers, tokens, kv_heads=heads,
                             head_dim=shape.head_dim, kv_dtype=kv_dtype, step=chunk, reuse_every=reuse_every,
                             batch=batch))
    act = hf_activation_bytes(shape, step, tokens, batch=batch, tp=tp, act_bytes=a, attention=attention)
    if kv_dtype in QUANTIZED_KV:  # one layer's keys and values read back, through float32 where scaled
        read = a + (4 if kv_dtype in SCALED_KV else 0)
        act += int(2 * batch * max(g.positions for g in groups) * heads * shape.head_dim * read)
    return HFMemory(tp=tp, tokens=tokens, batch=batch, chunk=step, weights=base.weights,
                    kv_cache=sum(g.bytes for g in groups), activations=act, reserve=int(reserve_gb * GB),
                    kv_dtype=kv_dtype, kv_groups=groups)


def longest_fitting(shape: ModelShape, capacity_bytes: float, *, chunk: int, batch: int = 1, tp: int = 1,
                    dtype: str = "bf16", attention: str = "evalctx_sdpa",
                    reserve_gb: float = DEFAULT_RESERVE_GB, **kv: Any) -> int:
    """The most positions per sequence (prompt plus budget) that fit ``capacity_bytes``; 0 when none do. ``kv``:
    :func:`hf_rank_memory`'s kv_dtype, windows and reuse_every."""
    def fits(n: int) -> bool:
        return hf_rank_memory(shape, n, chunk=chunk, batch=batch, tp=tp, dtype=dtype, attention=attention,
                              reserve_gb=reserve_gb, **kv).fits(capacity_bytes)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):  # memory grows with tokens, so double then bisect
        lo, hi = hi, hi * 2
        if hi > 1 << 40:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
