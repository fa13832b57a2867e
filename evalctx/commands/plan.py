"""``evalctx plan``: memory per GPU for a model at a context length, and the KV-cache size to ask TensorRT-LLM for.

Defaults come from the config: an engine config.json gives dtype, KV dtype, tp, pp, max_num_tokens, tokens per
block and max_seq_len; a Hugging Face config.json gives the shape only. Flags override.
With ``--backend hf`` it prints what the hf backend's memory preflight decides (evalctx.capacity.memory): weights, a KV
cache preallocated for the whole context, one prefill chunk's activations and a reserve, per tp.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from evalctx.commands.argtypes import fraction, non_negative_float, positive_float, positive_int
from evalctx.capacity.dtypes import canonical_dtype
from evalctx.capacity.engine_config import EngineConfig, short_dtype
from evalctx.errors import UsageError
from evalctx.capacity.kv_layout import bytes_per_position, layer_windows
from evalctx.capacity.plan import (DEFAULT_MAX_NUM_TOKENS, DEFAULT_TOKENS_PER_BLOCK, GB, KV_DTYPES, WEIGHT_DTYPES, ModelShape,
                          Plan, RankMemory, load_shape, plan)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan",
        help="estimate GPU memory (weights, KV cache, activations) and the KV cache to ask for",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="PATH",
                   help="model or engine directory, its config.json (HF or TensorRT-LLM engine), or an embedded "
                        "model name (tiny)")
    p.add_argument("--context", type=positive_int, metavar="TOKENS",
                   help="tokens per sequence, prompt plus generated (default: the engine's max_seq_len)")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences resident at once (default 1)")
    p.add_argument("--beams", type=positive_int, help="beam width (default 1)")
    p.add_argument("--tp", type=positive_int, help="tensor parallel size (default: the engine's, else 1)")
    p.add_argument("--pp", type=positive_int, help="pipeline parallel size (default: the engine's, else 1)")
    p.add_argument("--weight-dtype", metavar="DTYPE",
                   help=f"{', '.join(WEIGHT_DTYPES)} in any spelling (float16, half, bfloat16, ...); default: the "
                        "engine's, the HF torch_dtype, or fp16 (--backend hf: bf16, what its dtype=auto runs on "
                        "CUDA)")
    p.add_argument("--kv-dtype", metavar="DTYPE",
                   help=f"{', '.join(KV_DTYPES)} in any spelling; default: the engine's KV dtype, else the weight dtype")
    p.add_argument("--gpu-memory", type=positive_float, metavar="GB",
                   help="memory per GPU in GB (10^9 bytes; an 80 GB H100 has about 85); enables the fit check")
    p.add_argument("--max-num-tokens", type=positive_int,
                   help=f"engine max_num_tokens, the chunk size (default: the engine's, else {DEFAULT_MAX_NUM_TOKENS})")
    p.add_argument("--tokens-per-block", type=positive_int,
                   help=f"paged KV block size (default: the engine's, else {DEFAULT_TOKENS_PER_BLOCK})")
    p.add_argument("--kv-fraction", type=fraction,
                   help="kv_cache_free_gpu_memory_fraction the runtime will use (default 0.9)")
    p.add_argument("--reserve-gb", type=non_negative_float, default=2.0,
                   help="per-GPU memory for CUDA context, NCCL and TensorRT workspaces (default 2)")
    p.add_argument("--kv-headroom", type=non_negative_float,
                   help="extra fraction on max_tokens_in_paged_kv_cache (default 0.05)")
    p.add_argument("--backend", choices=("trtllm", "hf"), default="trtllm",
                   help="whose memory layout to plan (default trtllm; hf: what the hf backend's preflight decides)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="hf: prefill chunk in tokens (default: the hf backend's default)")
    p.add_argument("--kv-scale", choices=("token", "tensor"), default="token",
                   help="hf, with --kv-dtype fp8|int8: a scale per token and KV head (default), or fp8 with one unit "
                        "scale per tensor (the backend's kv_scale)")
    p.add_argument("--prefix-reuse", action="store_true",
                   help="hf: count the window snapshots prefix reuse keeps (the backend's prefix_reuse=true)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _hf_dtype(path: str) -> str | None:
    """The checkpoint dtype of a Hugging Face config (``torch_dtype``, or ``dtype`` in newer transformers)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    dtype = (data.get("torch_dtype") or data.get("dtype")) if isinstance(data, dict) else None
    return short_dtype(dtype) if dtype else None


def _config_path(spec: str) -> str:
    """A path as given, else an embedded model's directory (``tiny``)."""
    if Path(spec).expanduser().exists() or "/" in spec:
        return spec
    from evalctx.models.embedded import resolve_model

    return str(resolve_model(spec).path)


def _resolve(args: argparse.Namespace) -> Plan:
    shape, engine = load_shape(_config_path(args.config))
    e: EngineConfig | None = engine
    weight = args.weight_dtype or (e.weight_dtype if e else None) or _hf_dtype(shape.source) or "fp16"
    if args.weight_dtype is None and weight not in WEIGHT_DTYPES:
        weight = "fp16"
    kv = args.kv_dtype or (e.kv_dtype if e else None) or (weight if weight in ("fp16", "bf16", "fp32") else "fp16")
    context = args.context or (e.max_seq_len if e else None)
    if not context:
        raise UsageError("evalctx plan: pass --context TOKENS (the config has no max_seq_len)")
    return plan(
        shape, context, batch=args.batch, beams=args.beams or 1,
        tp=args.tp or (e.tp if e else 1), pp=args.pp or (e.pp if e else 1),
        weight_dtype=weight, kv_dtype=kv, gpu_memory_gb=args.gpu_memory,
        tokens_per_block=args.tokens_per_block or (e.tokens_per_block if e else DEFAULT_TOKENS_PER_BLOCK),
        max_num_tokens=args.max_num_tokens or (e.max_num_tokens if e and e.max_num_tokens else DEFAULT_MAX_NUM_TOKENS),
        kv_fraction=0.9 if args.kv_fraction is None else args.kv_fraction, reserve_gb=args.reserve_gb,
        kv_headroom=0.05 if args.kv_headroom is None else args.kv_headroom,
    )


def _gb(n: float) -> str:
    return f"{n / GB:,.2f}"


def _fits(m: RankMemory) -> str:
    return "-" if m.fits is None else "yes" if m.fits else "no"


def render(p: Plan) -> str:
    """The human-readable table ``evalctx plan`` prints."""
    s, r = p.shape, p.per_rank
    lines = [
        f"model    {s.architecture or 'model'} from {s.source}",
        f"shape    {s.num_layers} layers, hidden {s.hidden_size}, {s.num_attention_heads} heads "
        f"({s.num_kv_heads} KV, head_dim {s.head_dim}), intermediate {s.intermediate_size}, vocab {s.vocab_size}"
        + (f", {s.num_experts} experts" if s.num_experts > 1 else ""),
        f"weights  {p.params / 1e9:,.2f} B parameters, {p.weight_dtype}: {_gb(p.weight_bytes)} GB",
        f"KV cache {p.kv_dtype}: {p.kv_bytes_per_token:,} B/token whole model "
        f"({p.kv_bytes_per_token / 1024:,.1f} KiB), {p.kv_bytes_per_token_per_rank:,} B/token per rank "
        f"at tp {r.tp} pp {r.pp}",
        f"         {p.context:,} tokens x batch {p.batch} x beams {p.beams} = {p.kv_tokens:,} tokens "
        f"in {p.tokens_per_block}-token blocks: {_gb(p.kv_bytes)} GB whole model",
        f"ask      --backend-opt max_tokens_in_paged_kv_cache={p.max_tokens_in_paged_kv_cache} "
        f"(needed {p.kv_tokens:,}, plus headroom)",
        "",
        f"per rank at tp {r.tp}, pp {r.pp}".ljust(36) + "GB",
        f"  weights                        {_gb(r.weights):>8}",
        f"  KV cache                       {_gb(r.kv_cache):>8}",
        f"  weights + KV (before act.)     {_gb(r.before_activations):>8}",
        f"  activations (chunk {p.max_num_tokens:>6})    {_gb(r.activations):>8}",
        f"  reserve                        {_gb(r.reserve):>8}",
        f"  total                          {_gb(r.total):>8}",
    ]
    if p.gpu_memory_gb:
        lines.append(f"  fits {p.gpu_memory_gb:g} GB at KV fraction {p.kv_fraction:g}: {_fits(r)}")
    lines += ["", "  tp   weights        KV      act.     total   fits"]
    for m in p.by_tp:
        lines.append(f"  {m.tp:>2} {_gb(m.weights):>9} {_gb(m.kv_cache):>9} {_gb(m.activations):>9} "
                     f"{_gb(m.total):>9}   {_fits(m)}")
    if p.gpu_memory_gb:
        best = f"tp {p.min_tp}" if p.min_tp else "none of tp 1..16 (use pp, a smaller KV dtype or a shorter context)"
        lines.append(f"smallest tp that fits {p.gpu_memory_gb:g} GB per GPU: {best}")
    return "\n".join(lines)


def position_warning(context: int, shape: ModelShape) -> str | None:
    """A warning when the planned context is longer than the positions (or the sliding window in every layer)
    the model's config states; a Hugging Face config is read as the hf backend's preflight reads it (a rotary
    model's window RoPE-scaled as vLLM scales it: YaRN factor 4 over 32K states 128K)."""
    from evalctx.capacity.preflight import limits_from_hf_config

    try:
        data = json.loads(Path(shape.source).read_text())
    except (OSError, ValueError):
        data = None
    limits = limits_from_hf_config(_as_loaded(data)) if isinstance(data, dict) else None
    window = limits.attention_window if limits else None
    if window is not None and context > window:
        return (f"evalctx plan: warning: context {context:,} tokens exceeds the sliding window of {window:,} tokens "
                f"in every layer of the model ({shape.source}): a needle further back is out of sight, so evalctx "
                "run marks longer prompts unsupported")
    limit = shape.max_position_embeddings
    stated = (limits.max_positions or limits.trained_positions) if limits else None
    what = "max_position_embeddings"
    if stated is not None and stated != limit:
        limit, what = stated, f"stated window (max_position_embeddings {limit:,}, RoPE-scaled)"
    if limit is None or context <= limit:
        return None
    return (f"evalctx plan: warning: context {context:,} tokens exceeds the model's {what} {limit:,} "
            f"({shape.source}): positions beyond it were never trained, and models with absolute "
            "position embeddings cannot run there at all")


def _as_loaded(data: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face config.json as transformers loads it (``layer_types`` derived from Gemma 2's alternation or
    Qwen2's ``max_window_layers``), which is what the hf backend's preflight reads; as written where transformers
    is missing or does not know the model type."""
    try:
        from transformers import AutoConfig
    except ImportError:
        return data
    try:
        return AutoConfig.for_model(**data).to_dict()
    except Exception:  # an unknown model type or a config transformers refuses: read it as written
        return data


_TRTLLM_ONLY = ("--pp", "--beams", "--max-num-tokens", "--tokens-per-block", "--kv-fraction", "--kv-headroom")


def _hf_attention(source: str) -> str:
    """The attention the hf backend picks on CUDA for this config (its ``attn_implementation=auto``)."""
    from types import SimpleNamespace

    from evalctx.backends.hf.attention import auto_attention

    data = json.loads(Path(source).read_text())
    return auto_attention(SimpleNamespace(**data), on_cuda=True)


def _hf(args: argparse.Namespace) -> str:
    """The hf backend's view: per tp, weights + preallocated KV + chunk activations + reserve, and what fits."""
    from evalctx.backends.hf.attention import LOWER_RIGHT_SDPA
    from evalctx.backends.hf.backend import HFBackend
    from evalctx.capacity.memory import hf_rank_memory, longest_fitting

    shape, engine = load_shape(_config_path(args.config))
    if engine is not None:
        raise UsageError("evalctx plan --backend hf: pass a Hugging Face model directory, not a TensorRT-LLM engine")
    values = (args.pp not in (None, 1), args.beams not in (None, 1), args.max_num_tokens is not None,
              args.tokens_per_block is not None, args.kv_fraction is not None, args.kv_headroom is not None)
    trtllm_only = [flag for flag, given in zip(_TRTLLM_ONLY, values) if given]
    if trtllm_only:  # silently planning without them would answer a question the user did not ask
        raise UsageError(f"evalctx plan --backend hf: {', '.join(trtllm_only)} are TensorRT-LLM settings the hf "
                         "backend does not have; drop them (its prefill chunk is --chunk-size)")
    hf_dtypes = ("fp32", "fp16", "bf16")
    given = canonical_dtype(args.weight_dtype, None, "--weight-dtype") if args.weight_dtype else None
    # The backend's dtype=auto runs bfloat16 on CUDA whatever the checkpoint holds (an fp32 checkpoint included).
    dtype = given or "bf16"
    if dtype not in hf_dtypes:
        raise UsageError(f"evalctx plan --backend hf: the hf backend runs fp32, fp16 or bf16, not {dtype}")
    kv_dtype = canonical_dtype(args.kv_dtype, None, "--kv-dtype") if args.kv_dtype else dtype
    if kv_dtype not in (dtype, "fp8", "int8"):
        raise UsageError(f"evalctx plan --backend hf: the hf backend keeps the KV cache in the model dtype "
                         f"({dtype}; --weight-dtype sets it), fp8 or int8, not {kv_dtype}")
    if args.kv_scale == "tensor":
        if kv_dtype != "fp8":
            raise UsageError("evalctx plan --backend hf: --kv-scale tensor is fp8's uncalibrated per-tensor scale: "
                             "pass it with --kv-dtype fp8")
        kv_dtype = "fp8_tensor"
    if args.prefix_reuse and args.chunk_size == 0:
        raise UsageError("evalctx plan --backend hf: prefix reuse reuses whole prefill chunks: drop --prefix-reuse "
                         "or pass --chunk-size > 0, as the backend requires")
    if not args.context:
        raise UsageError("evalctx plan: pass --context TOKENS (prompt plus generated)")
    warning = position_warning(args.context, shape)
    if warning:
        print(warning, file=sys.stderr)
    chunk = HFBackend.Options().chunk_size if args.chunk_size is None else args.chunk_size
    tp = args.tp or 1
    if shape.num_attention_heads % tp or shape.num_kv_heads % tp:
        raise UsageError(f"tp {tp} does not divide the {shape.num_attention_heads} attention and "
                         f"{shape.num_kv_heads} KV heads")
    attention = _hf_attention(shape.source)
    windows = layer_windows(_as_loaded(json.loads(Path(shape.source).read_text())))
    common = dict(chunk=chunk, batch=args.batch, dtype=dtype, reserve_gb=args.reserve_gb, attention=attention,
                  kv_dtype=kv_dtype, windows=windows, reuse_every=chunk if args.prefix_reuse else 0)
    tps = [t for t in (1, 2, 4, 8, 16) if shape.num_attention_heads % t == 0 and shape.num_kv_heads % t == 0]
    rows = {t: hf_rank_memory(shape, args.context, tp=t, **common) for t in sorted({tp, *tps})}
    gpu = args.gpu_memory * GB if args.gpu_memory else None
    longest = {t: longest_fitting(shape, gpu, tp=t, **common) for t in rows} if gpu else {}
    if args.json:
        return json.dumps({"backend": "hf", "shape": shape.__dict__, "context": args.context, "dtype": dtype,
                           "kv_dtype": kv_dtype, "prefix_reuse": args.prefix_reuse,
                           "attn_implementation": attention, "chunk_size": chunk, "gpu_memory_gb": args.gpu_memory,
                           "per_rank": rows[tp].to_dict(),
                           "by_tp": [{**m.to_dict(), "fits": m.fits(gpu) if gpu else None,
                                      "longest_context": longest.get(t)} for t, m in rows.items()]}, indent=2)
    m = rows[tp]
    lines = [
        f"model    {shape.architecture or 'model'} from {shape.source}",
        f"hf       {dtype} weights{'' if given else ' (dtype=auto on CUDA)'}, {kv_dtype} KV cache"
        f"{' with a float32 scale per token and KV head' if kv_dtype in ('fp8', 'int8') else ''}, preallocated for "
        f"{args.context:,} tokens x batch {args.batch}, prefill chunk {m.chunk}, "
        + ("lower-right SDPA (no mask tensor)" if attention == LOWER_RIGHT_SDPA else
           f"attention {attention} (not plain causal: a chunk x context mask per chunk)"),
        "",
        f"per rank at tp {tp}".ljust(36) + "GB",
        f"  weights                        {_gb(m.weights):>8}",
        f"  KV cache                       {_gb(m.kv_cache):>8}",
        *_kv_lines(m, shape, tp),
        f"  activations (chunk {m.chunk:>6})    {_gb(m.activations):>8}",
        f"  reserve                        {_gb(m.reserve):>8}",
        f"  total                          {_gb(m.total):>8}",
        "",
        "  tp   weights        KV      act.     total   fits   longest context that fits",
    ]
    for t, r in rows.items():
        fits = "-" if gpu is None else "yes" if r.fits(gpu) else "no"
        lines.append(f"  {t:>2} {_gb(r.weights):>9} {_gb(r.kv_cache):>9} {_gb(r.activations):>9} {_gb(r.total):>9}"
                     f"   {fits:>4}   {format(longest[t], ',') if gpu else '-'}")
    if gpu:
        best = next((t for t, r in rows.items() if r.fits(gpu)), None)
        lines.append(f"smallest tp that fits {args.gpu_memory:g} GB per GPU: "
                     + (f"tp {best}" if best else "none (a shorter context, or a smaller batch)"))
    return "\n".join(lines)


def _kv_lines(m: Any, shape: ModelShape, tp: int) -> list[str]:
    """The KV cache per layer kind: layers, positions held, bytes per token per layer, GB; and what the window-only
    layout saves against keeping every position in every layer."""
    import math

    per_pos = bytes_per_position(math.ceil(shape.num_kv_heads / tp), shape.head_dim, m.kv_dtype)
    lines = [f"    {g.kind:<14} {g.layers:>3} layers x {g.positions:>11,} positions  {per_pos:>6,} B/token/layer"
             f"  {_gb(g.bytes):>8}" for g in m.kv_groups]
    whole = per_pos * shape.num_layers * m.tokens * m.batch
    if len(m.kv_groups) > 1 or (m.kv_groups and m.kv_groups[0].window is not None):
        lines.append(f"    every position in every layer would be {_gb(whole)} GB: this layout holds "
                     f"{m.kv_cache / whole:.2f}x")
    return lines


def main(args: argparse.Namespace) -> int:
    if args.backend == "hf":
        print(_hf(args))
        return 0
    p = _resolve(args)
    warning = position_warning(p.context, p.shape)
    if warning:
        print(warning, file=sys.stderr)
    print(json.dumps(p.to_dict(), indent=2) if args.json else render(p))
    return 0
