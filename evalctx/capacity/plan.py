"""Memory planner: will this model, at this context length, fit on these GPUs, and what KV cache to ask for.

Per rank, memory = weights + KV cache + activations + a fixed reserve, where

* **weights** = parameter count (embeddings, q/k/v/o with GQA, gated MLP, norms, lm_head unless tied) x bytes. The
  transformer layers split over tp (heads/columns) and pp (layers). The embedding table is replicated on every tp
  rank (TensorRT-LLM's default without ``--use_parallel_embedding``); lm_head is split over tp. Quantized dtypes
  (fp8/int8/int4) apply to the linear layers only: embeddings, lm_head and norms stay 16-bit, as the quantizers
  leave them. Scales and zero points are not counted (about 1.5% for int4 with group 128).
* **KV cache** = 2 (K and V) x layers x KV heads x head_dim x KV bytes per token. A rank holds ceil(layers/pp)
  layers and ceil(KV heads/tp) heads (heads are replicated when tp > KV heads) for *every* token, so the token
  capacity (``max_tokens_in_paged_kv_cache``) is never divided by tp.
* **activations**: with chunked context an engine step sees at most ``max_num_tokens`` (M) tokens, and TensorRT
  reuses activation memory across layers, so one layer's live buffers bound it:
  ``M x act_bytes x (4 x hidden + (heads/tp + 2 x ceil(kv/tp) + heads/tp) x head_dim + 3 x intermediate/tp)``
  (residual, norm, attention and MLP outputs at full hidden size on every tp rank; q/k/v and the attention context
  split by heads; gate, up and their product split by columns) plus fp32 logits of the last position,
  ``batch x beams x vocab x 4``. This is a lower bound: the reserve (default 2 GB) stands for the CUDA context,
  NCCL buffers and TensorRT workspaces, which depend on the GPU and the release; measure and pass your own.

The runtime gives the KV cache ``kv_fraction`` (0.9) of the memory left after weights and activations, so a layout
fits when ``weights + activations + reserve + KV / kv_fraction <= GPU memory``. GB here means 10^9 bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from evalctx.capacity.dtypes import canonical_dtype
from evalctx.capacity.engine_config import EngineConfig, is_engine_config, parse_engine_config
from evalctx.errors import UsageError

GB = 1e9
DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
WEIGHT_DTYPES = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
KV_DTYPES = ("fp16", "bf16", "fp8", "int8", "fp32")
TP_CANDIDATES = (1, 2, 4, 8, 16)
DEFAULT_TOKENS_PER_BLOCK = 32  # 1.x PluginConfig and LLM-API KvCacheConfig default (0.x engines: 64)
DEFAULT_MAX_NUM_TOKENS = 8192  # trtllm-build's default (1.x BuildConfig)


def dtype_bytes(dtype: str | float, allowed: tuple[str, ...] = WEIGHT_DTYPES) -> float:
    """Bytes per element; ``dtype`` in any standard spelling (``float16``, ``fp16``, ``half``, see evalctx.capacity.dtypes)."""
    if isinstance(dtype, (int, float)):
        return float(dtype)
    return DTYPE_BYTES[canonical_dtype(dtype, allowed)]


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: str | float = "fp16",
                       tp: int = 1, pp: int = 1) -> int:
    """KV-cache bytes one token costs on one rank (tp=pp=1: the whole model)."""
    per_elem = dtype_bytes(kv_dtype, KV_DTYPES)
    return int(2 * math.ceil(num_layers / pp) * math.ceil(num_kv_heads / tp) * head_dim * per_elem)


@dataclass(frozen=True)
class ModelShape:
    """The shape numbers the arithmetic needs, from a Hugging Face or an engine config.json."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 1
    """Experts per MoE layer (1 = dense); every expert's weights are resident."""
    architecture: str | None = None
    source: str = ""
    max_position_embeddings: int | None = None
    """The positions the config states (``max_position_embeddings``, GPT-2's ``n_positions``); None if absent."""

    def params(self) -> dict[str, int]:
        """Parameter counts by part; ``total`` is what the checkpoint holds."""
        h, L = self.hidden_size, self.num_layers
        attn = h * self.num_attention_heads * self.head_dim * 2 + h * self.num_kv_heads * self.head_dim * 2
        mlp = 3 * h * self.intermediate_size * self.num_experts + (h * self.num_experts if self.num_experts > 1 else 0)
        parts = {
            "embedding": self.vocab_size * h,
            "attention": L * attn,
            "mlp": L * mlp,
            "norms": L * 2 * h + h,
            "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * h,
        }
        parts["total"] = sum(parts.values())
        return parts

    def kv_bytes_per_token(self, kv_dtype: str | float = "fp16", tp: int = 1, pp: int = 1) -> int:
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, kv_dtype, tp, pp)


def shape_from_hf(cfg: Mapping[str, Any], source: str = "") -> ModelShape:
    """Llama-style Hugging Face config (``text_config`` of multimodal wrappers is used when present)."""
    c = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    try:
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        shape = ModelShape(
            num_layers=int(c["num_hidden_layers"]),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads),
            intermediate_size=int(c["intermediate_size"]),
            vocab_size=int(c["vocab_size"]),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
            num_experts=int(c.get("num_local_experts") or c.get("num_experts") or 1),
            architecture=(cfg.get("architectures") or [None])[0],
            source=source,
            max_position_embeddings=_positions(c),
        )
    except KeyError as exc:
        raise UsageError(f"{source}: config has no {exc.args[0]!r}; evalctx plan needs a Llama-style config") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{source}: bad value in config ({exc})") from None
    return shape


def _positions(c: Mapping[str, Any]) -> int | None:
    value = c.get("max_position_embeddings") or c.get("n_positions")
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def shape_from_engine(cfg: EngineConfig) -> ModelShape:
    if cfg.intermediate_size is None or cfg.vocab_size is None:
        raise UsageError(
            f"{cfg.path}/config.json has no intermediate_size or vocab_size: pass the model's Hugging Face config.json"
        )
    return ModelShape(cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                      cfg.head_size, cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings,
                      architecture=cfg.architecture, source=f"{cfg.path}/config.json",
                      max_position_embeddings=cfg.max_position_embeddings)


def load_shape(path: str | Path) -> tuple[ModelShape, EngineConfig | None]:
    """A config.json or a directory holding one; an engine config also returns its :class:`EngineConfig`."""
    p = Path(path).expanduser()
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise UsageError(f"config not found: {file} (pass a model or engine directory, or its config.json)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{file}: expected a JSON object")
    if is_engine_config(data):
        engine = parse_engine_config(data, file)
        return shape_from_engine(engine), engine
    return shape_from_hf(data, str(file)), None


@dataclass(frozen=True)
class RankMemory:
    """Bytes on the busiest rank of one tp x pp layout."""

    tp: int
    pp: int
    weights: int
    kv_cache: int
    activations: int
    reserve: int
    fits: bool | None
    """None when no GPU memory was given."""

    @property
    def before_activations(self) -> int:
        return self.weights + self.kv_cache

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.reserve


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    context: int
    """Tokens per sequence the cache must hold: prompt plus generated."""
    batch: int
    beams: int
    weight_dtype: str
    kv_dtype: str
    tokens_per_block: int
    max_num_tokens: int
    gpu_memory_gb: float | None
    kv_fraction: float
    params: int
    weight_bytes: int
    """All weights, whole model."""
    kv_bytes_per_token: int
    """Whole model."""
    kv_bytes_per_token_per_rank: int
    kv_tokens: int
    """context x batch x beams with each sequence rounded up to whole blocks: the minimum the cache must hold."""
    kv_bytes: int
    """KV cache for ``kv_tokens``, whole model."""
    max_tokens_in_paged_kv_cache: int
    """What to ask the runtime for: ``kv_tokens`` plus headroom, in whole blocks (a cap, not an allocation)."""
    per_rank: RankMemory
    """At the requested tp and pp."""
    by_tp: list[RankMemory] = field(default_factory=list)
    min_tp: int | None = None
    """Smallest tp (1, 2, 4, 8, 16 dividing the heads) that fits the GPU; None when none does or no GPU given."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for row, mem in zip([d["per_rank"], *d["by_tp"]], [self.per_rank, *self.by_tp]):
            row.update(before_activations=mem.before_activations, total=mem.total)
        return d


def _ceil_to(n: float, unit: int) -> int:
    return int(math.ceil(n / unit) * unit)


def activation_bytes(shape: ModelShape, max_num_tokens: int, batch: int = 1, beams: int = 1, tp: int = 1,
                     act_bytes: float = 2.0) -> int:
    """One layer's live buffers for a chunk of ``max_num_tokens`` tokens, plus last-position fp32 logits."""
    m, hd = max_num_tokens, shape.head_dim
    q_heads = shape.num_attention_heads / tp
    per_token = (4 * shape.hidden_size + (2 * q_heads + 2 * math.ceil(shape.num_kv_heads / tp)) * hd
                 + 3 * shape.intermediate_size / tp)
    return int(m * act_bytes * per_token + batch * beams * shape.vocab_size * 4)


def rank_memory(shape: ModelShape, *, tp: int, pp: int, weight_dtype: str, kv_dtype: str, kv_tokens: int,
                max_num_tokens: int, batch: int = 1, beams: int = 1, reserve_bytes: int = 0,
                gpu_bytes: float | None = None, kv_fraction: float = 0.9) -> RankMemory:
    w = dtype_bytes(weight_dtype)
    dense = 4.0 if weight_dtype == "fp32" else 2.0  # embeddings, lm_head and norms are not quantized
    p = shape.params()
    layers_here = math.ceil(shape.num_layers / pp) / shape.num_layers
    layers = layers_here * ((p["attention"] + p["mlp"]) / tp * w + (p["norms"] - shape.hidden_size) * dense)
    first = p["embedding"] * dense
    last = (p["lm_head"] / tp + shape.hidden_size) * dense
    weights = int(layers + (first + last if pp == 1 else max(first, last)))
    kv = shape.kv_bytes_per_token(kv_dtype, tp, pp) * kv_tokens
    act = activation_bytes(shape, max_num_tokens, batch, beams, tp, 4.0 if weight_dtype == "fp32" else 2.0)
    fits = None
    if gpu_bytes is not None:
        fits = weights + act + reserve_bytes + kv / kv_fraction <= gpu_bytes
    return RankMemory(tp, pp, weights, kv, act, reserve_bytes, fits)


def plan(shape: ModelShape, context: int, *, batch: int = 1, beams: int = 1, tp: int = 1, pp: int = 1,
         weight_dtype: str = "fp16", kv_dtype: str = "fp16", gpu_memory_gb: float | None = None,
         tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK, max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS,
         kv_fraction: float = 0.9, reserve_gb: float = 2.0, kv_headroom: float = 0.05) -> Plan:
    """Memory for ``context`` tokens per sequence at the given layout, and the smallest tp that fits."""
    for name, value in (("context", context), ("batch", batch), ("beams", beams), ("tp", tp), ("pp", pp),
                        ("tokens_per_block", tokens_per_block), ("max_num_tokens", max_num_tokens)):
        if int(value) < 1:
            raise UsageError(f"evalctx plan: {name} must be >= 1, got {value}")
    if not 0 < kv_fraction <= 1:
        raise UsageError(f"evalctx plan: kv fraction must be in (0, 1], got {kv_fraction}")
    weight_dtype = canonical_dtype(weight_dtype, WEIGHT_DTYPES, "weight dtype")
    kv_dtype = canonical_dtype(kv_dtype, KV_DTYPES, "KV-cache dtype")
    if shape.num_attention_heads % tp:
        raise UsageError(f"tp {tp} does not divide the {shape.num_attention_heads} attention heads")
    # Blocks are per sequence: each sequence's last block is partly empty.
    kv_tokens = _ceil_to(context, tokens_per_block) * batch * beams
    # max_tokens is a cap (the runtime takes min(fraction-derived, max_tokens)), so a little headroom costs
    # nothing and guards against off-by-a-block sizing; the 1M README recipe asks ~1.1M for 1,048,576.
    ask = _ceil_to(kv_tokens * (1 + kv_headroom), tokens_per_block)
    gpu = gpu_memory_gb * GB if gpu_memory_gb else None
    common = dict(weight_dtype=weight_dtype, kv_dtype=kv_dtype, kv_tokens=kv_tokens, max_num_tokens=max_num_tokens,
                  batch=batch, beams=beams, reserve_bytes=int(reserve_gb * GB), gpu_bytes=gpu,
                  kv_fraction=kv_fraction)
    by_tp = [rank_memory(shape, tp=t, pp=pp, **common) for t in TP_CANDIDATES if shape.num_attention_heads % t == 0]
    min_tp = next((r.tp for r in by_tp if r.fits), None)
    params = shape.params()
    dense_params = params["embedding"] + params["lm_head"] + params["norms"]
    dense = 4.0 if weight_dtype == "fp32" else 2.0
    weight_bytes = int((params["total"] - dense_params) * dtype_bytes(weight_dtype) + dense_params * dense)
    return Plan(
        shape=shape, context=context, batch=batch, beams=beams, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
        tokens_per_block=tokens_per_block, max_num_tokens=max_num_tokens, gpu_memory_gb=gpu_memory_gb,
        kv_fraction=kv_fraction, params=params["total"], weight_bytes=weight_bytes,
        kv_bytes_per_token=shape.kv_bytes_per_token(kv_dtype),
        kv_bytes_per_token_per_rank=shape.kv_bytes_per_token(kv_dtype, tp, pp),
        kv_tokens=kv_tokens, kv_bytes=shape.kv_bytes_per_token(kv_dtype) * kv_tokens,
        max_tokens_in_paged_kv_cache=ask, per_rank=rank_memory(shape, tp=tp, pp=pp, **common),
        by_tp=by_tp, min_tp=min_tp,
    )
