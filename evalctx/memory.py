"""Memory per GPU of one rank of a tensor-parallel replica running chunked prefill: weights + KV cache + activations.

The arithmetic is engine-agnostic (a :class:`~evalctx.plan.ModelShape`, a dtype, tp, a chunk and the tokens the
cache must hold in, bytes out); what differs between engines is which buffers stay live while one chunk runs,
passed as :class:`Activations`. The hf backend's preflight and ``evalctx plan --backend hf`` call it, so what the
planner prints is what the backend decides. (The TensorRT-LLM activation model still lives in
:func:`evalctx.plan.activation_bytes`; ``plan()`` keeps its ``kv_cache_free_gpu_memory_fraction`` logic.)

Per rank, for a batch of ``b`` sequences of ``tokens`` positions (prompt plus generation budget), tp ``K``:

* **weights**: the attention and MLP matrices split over K (transformers' tp plan for Llama-style models:
  q/k/v/gate/up column-wise, o/down row-wise); the embedding table and norms replicated on every rank; lm_head
  split column-wise (its output is gathered). Same layout as :func:`evalctx.plan.rank_memory` at pp=1.
* **KV cache**: preallocated for ``b x tokens`` positions, ``2 x layers x ceil(kv_heads/K) x head_dim`` elements each.
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
from typing import Any

from evalctx.plan import GB, ModelShape, rank_memory

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
        return {**asdict(self), "total": self.total}


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
                   reserve_gb: float = DEFAULT_RESERVE_GB) -> HFMemory:
    """Memory one rank of an hf replica needs for ``batch`` sequences of ``tokens`` positions.

    ``chunk`` 0 means the whole prompt in one step; a chunk longer than ``tokens`` is cut to it. ``dtype`` is the
    weights' and KV cache's (fp32, fp16, bf16). Raises :class:`~evalctx.errors.UsageError` for an unknown dtype.
    """
    step = min(chunk or tokens, tokens)
    base = rank_memory(shape, tp=tp, pp=1, weight_dtype=dtype, kv_dtype=dtype, kv_tokens=tokens * batch,
                       max_num_tokens=max(1, step), batch=batch)
    act = hf_activation_bytes(shape, step, tokens, batch=batch, tp=tp,
                              act_bytes=4.0 if dtype == "fp32" else 2.0, attention=attention)
    return HFMemory(tp=tp, tokens=tokens, batch=batch, chunk=step, weights=base.weights, kv_cache=base.kv_cache,
                    activations=act, reserve=int(reserve_gb * GB))


def longest_fitting(shape: ModelShape, capacity_bytes: float, *, chunk: int, batch: int = 1, tp: int = 1,
                    dtype: str = "bf16", attention: str = "evalctx_sdpa",
                    reserve_gb: float = DEFAULT_RESERVE_GB) -> int:
    """The most positions per sequence (prompt plus budget) that fit ``capacity_bytes``; 0 when none do."""
    def fits(n: int) -> bool:
        return hf_rank_memory(shape, n, chunk=chunk, batch=batch, tp=tp, dtype=dtype, attention=attention,
                              reserve_gb=reserve_gb).fits(capacity_bytes)

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
