"""Which samples an engine cannot run, decided from its configuration before any GPU work.

A sample that cannot run correctly must never reach the engine: TensorRT-LLM either rejects it mid-run, or, worse,
runs it wrong without an error (a KV cache smaller than the sequence shrinks the attention window, and a needle
near the start is then silently out of sight). The runner marks these samples ``unsupported``: not run, not
scored. Each reason is one line that says what to change.

The same holds for models that cannot see the whole prompt: a sliding attention window (Mistral's ``sliding_window``,
TensorRT-LLM's ``max_attention_window_size``) hides everything further back than the window, and learned absolute
position embeddings (GPT-2's ``n_positions``) end where the table ends. Those prompts are unsupported too. Rotary
(RoPE) models beyond their stated window (``max_position_embeddings``) still run -- how well they extrapolate is a
measurement -- but their rows carry the flag ``beyond_trained_window`` (:func:`window_flags`).

The logic is pure (numbers in, reasons out) so every backend with engine-like limits can reuse it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol

from evalctx.capacity.engine_config import EngineConfig


class SampleLike(Protocol):
    """A :class:`~evalctx.records.Sample` or a not-yet-built sample spec: the length is exact either way."""

    id: str
    context_length: int
    max_new_tokens: int


@dataclass(frozen=True)
class EngineLimits:
    """The limits a sample is checked against; None means unknown (that check is skipped)."""

    max_seq_len: int | None = None
    """Positions the engine holds per sequence (trtllm-build --max_seq_len)."""
    max_input_len: int | None = None
    """Longest prompt the runtime accepts (the value passed at load time, not the build-time one)."""
    max_num_tokens: int | None = None
    """Tokens per engine step; without chunked context the whole prompt must fit in one step."""
    paged_context_fmha: bool = True
    """Whether the engine can run chunked context at all (paged KV cache and paged context FMHA)."""
    chunked_context: bool = True
    """Whether chunked context is switched on at run time."""
    kv_cache_tokens: int | None = None
    """KV-cache capacity in tokens (max_tokens_in_paged_kv_cache) when known before load."""
    tokens_per_block: int = 1
    """KV blocks are whole: a sequence takes ceil(tokens / tokens_per_block) blocks."""
    seq_len_margin: int = 0
    """Positions to keep free. TensorRT-LLM accepts prompt + new tokens == max_seq_len and, above it, silently
    lowers max_new_tokens (LlmRequest::validate), which would cut the answer: so the bound is max_seq_len itself."""
    attention_window: int | None = None
    """Tokens a query attends back to when every layer has a sliding window (HF ``sliding_window``, TensorRT-LLM
    ``max_attention_window_size``); None = full attention in at least one layer."""
    sink_tokens: int = 0
    """Tokens at the start that stay in view despite the window (StreamingLLM sinks, TensorRT-LLM
    ``sink_token_length``): they keep the instruction, not the middle of the haystack, in sight."""
    max_positions: int | None = None
    """Positions of learned absolute position embeddings (GPT-2 ``n_positions``); the model cannot run beyond."""
    trained_positions: int | None = None
    """The window a rotary model's config states (``max_position_embeddings``, times the RoPE scaling factor where
    serving engines scale it: :func:`stated_window`): beyond it rows are flagged."""


def limits_from_engine(engine: EngineConfig, *, max_input_len: int | None, chunked_context: bool,
                       kv_cache_tokens: int | None, attention_window: int | None = None,
                       sink_tokens: int = 0) -> EngineLimits:
    """Limits of a TensorRT-LLM engine as it will be loaded (runtime values passed in by the backend).

    ``attention_window``/``sink_tokens``: the runtime's ``max_attention_window_size`` and ``sink_token_length``.
    The engine's ``max_position_embeddings`` ends learned absolute positions (``position_embedding_type =
    learned_absolute``: prompts beyond are unsupported), states no window for ALiBi, and is a rotary model's stated
    window otherwise (rows beyond it are flagged).
    """
    kind = (engine.position_embedding_type or "").lower()
    absolute = kind == "learned_absolute"
    return EngineLimits(
        attention_window=attention_window,
        sink_tokens=sink_tokens,
        max_positions=engine.max_position_embeddings if absolute else None,
        trained_positions=None if absolute or kind.startswith("alibi") else engine.max_position_embeddings,
        max_seq_len=engine.max_seq_len,
        max_input_len=max_input_len,
        max_num_tokens=engine.max_num_tokens,
        paged_context_fmha=engine.supports_chunked_context,
        chunked_context=chunked_context,
        kv_cache_tokens=kv_cache_tokens,
        tokens_per_block=engine.tokens_per_block,
    )


def check(prompt_tokens: int, max_new_tokens: int, limits: EngineLimits) -> str | None:
    """The first reason this prompt cannot run, or None when it can."""
    p, g = prompt_tokens, max_new_tokens
    need = p + g
    if limits.max_seq_len is not None and need > limits.max_seq_len - limits.seq_len_margin:
        longest = limits.max_seq_len - limits.seq_len_margin - g
        return (
            f"prompt {p} + max_new_tokens {g} = {need} tokens but the engine's max_seq_len is {limits.max_seq_len}: "
            f"rebuild the engine with --max_seq_len >= {need + limits.seq_len_margin} or drop lengths > {longest}"
        )
    if limits.max_input_len is not None and p > limits.max_input_len:
        return (
            f"prompt {p} tokens > the runtime's maximum input length {limits.max_input_len}: rebuild with a larger "
            f"--max_seq_len (or --max_input_len), or drop lengths > {limits.max_input_len}"
        )
    chunked = limits.paged_context_fmha and limits.chunked_context
    if limits.max_num_tokens is not None and p > limits.max_num_tokens and not chunked:
        m = limits.max_num_tokens
        if not limits.paged_context_fmha:
            return (
                f"prompt {p} tokens > max_num_tokens {m} and the engine has no paged context FMHA, so chunked "
                f"context cannot run (INT8 KV cache, or FP8 KV without FP8 weights, turns it off): rebuild with "
                f"--use_paged_context_fmha enable and an FP16/BF16 (or FP8-quantized) KV cache, or with "
                f"--max_num_tokens >= {p}, or drop lengths > {m}"
            )
        return (
            f"prompt {p} tokens > max_num_tokens {m} and chunked context is off: pass "
            f"--backend-opt enable_chunked_context=true (trtllm-llm: enable_chunked_prefill=true) or drop lengths > {m}"
        )
    reason = _model_reason(p, g, limits)
    if reason is not None:
        return reason
    if limits.kv_cache_tokens is not None:
        block = max(1, limits.tokens_per_block)
        capacity = limits.kv_cache_tokens // block * block  # the pool holds whole blocks
        need_kv = math.ceil(need / block) * block
        if need_kv > capacity:
            return (
                f"prompt {p} + max_new_tokens {g} needs {need_kv} KV-cache tokens but max_tokens_in_paged_kv_cache "
                f"is {limits.kv_cache_tokens}: the attention window would shrink silently and early needles would "
                f"be lost; raise max_tokens_in_paged_kv_cache to >= {need_kv} (see evalctx plan) or drop lengths "
                f"> {max(0, capacity - g)}"
            )
    return None


def _model_reason(p: int, g: int, limits: EngineLimits) -> str | None:
    """What the model (not the engine's buffers) cannot see: absolute positions, a sliding window."""
    need = p + g
    if limits.max_positions is not None and need > limits.max_positions:
        return (f"prompt {p} + max_new_tokens {g} = {need} tokens but the model has {limits.max_positions} learned "
                f"absolute positions (max_position_embeddings): it cannot run beyond them; drop lengths > "
                f"{max(0, limits.max_positions - g)}")
    if limits.attention_window is not None and need > limits.attention_window:
        sinks = f" and its first {limits.sink_tokens} (sink tokens)" if limits.sink_tokens else ""
        return (f"prompt {p} + max_new_tokens {g} = {need} tokens but attention sees only the last "
                f"{limits.attention_window} tokens{sinks} (a sliding window): a needle further back is out of "
                f"sight, and scoring it would credit the model for text it never read; drop lengths > "
                f"{max(0, limits.attention_window - g)} or use a model or engine without the window")
    return None


def window_flags(prompt_tokens: int, max_new_tokens: int, limits: EngineLimits | None) -> list[str]:
    """``["beyond_trained_window"]`` when prompt plus budget exceeds a rotary model's stated window, else []."""
    if limits is None or limits.trained_positions is None:
        return []
    return ["beyond_trained_window"] if prompt_tokens + max_new_tokens > limits.trained_positions else []


ABSOLUTE_POSITION_MODELS = frozenset({"gpt2", "gpt_neo", "opt", "gpt_bigcode", "biogpt", "xglm", "ctrl",
                                      "openai-gpt", "bert", "roberta", "xlm-roberta", "electra", "megatron-bert"})
"""Hugging Face model types with a position-embedding table: positions beyond it do not exist."""
ALIBI_MODELS = frozenset({"bloom", "mpt"})
"""Model types that add a distance bias instead of position embeddings: no stated window to mark."""


def limits_from_hf_config(config: Mapping[str, Any]) -> EngineLimits:
    """What a Hugging Face model config says it can see (``config.to_dict()`` or a config.json).

    * every layer sliding (``sliding_window`` set, ``use_sliding_window`` not false, and ``layer_types``, when
      given, all ``sliding_attention``) -> ``attention_window``; one full-attention layer (Gemma 2/3, Qwen2 below
      ``max_window_layers``) sees the whole prompt, so no limit;
    * learned absolute positions (``position_embedding_type = "absolute"`` or a model type in
      :data:`ABSOLUTE_POSITION_MODELS`) -> ``max_positions`` from ``max_position_embeddings``/``n_positions``;
    * otherwise (rotary) ``max_position_embeddings`` -> ``trained_positions``; ALiBi models state none.

    A multimodal wrapper's ``text_config`` is read when present.
    """
    c = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    model_type = str(c.get("model_type") or config.get("model_type") or "")
    positions = c.get("max_position_embeddings") or c.get("n_positions")
    positions = int(positions) if isinstance(positions, (int, float)) and positions > 0 else None
    window = c.get("sliding_window")
    types = c.get("layer_types") or []
    sliding = (isinstance(window, int) and window > 0 and c.get("use_sliding_window", True) is not False
               and all(t == "sliding_attention" for t in types))
    absolute = c.get("position_embedding_type") == "absolute" or model_type in ABSOLUTE_POSITION_MODELS
    return EngineLimits(
        attention_window=int(window) if sliding else None,
        max_positions=positions if absolute else None,
        trained_positions=stated_window(c, positions) if not absolute and model_type not in ALIBI_MODELS else None,
    )


# RoPE types whose max_position_embeddings already is the extended window (vLLM leaves them unscaled).
_WINDOW_AS_STATED = frozenset({"su", "longrope", "llama3", "default"})


def stated_window(c: Mapping[str, Any], positions: int | None) -> int | None:
    """The window a rotary model's config states, derived as vLLM derives its default ``max_model_len``
    (``_get_and_verify_max_len``): ``max_position_embeddings``, times the RoPE scaling ``factor`` for the types
    that extend it (linear, dynamic NTK); YaRN's ``original_max_position_embeddings`` times its factor (factor 4
    over 32768 states 131072); LongRoPE, llama3 and unscaled RoPE as stated; Gemma 3 as stated (its
    max_position_embeddings is already scaled). ``c``: the (text) config as a dict; rope parameters from
    transformers 5's ``rope_parameters`` (one set, or one per layer type) or 4.x's ``rope_scaling``."""
    params = c.get("rope_parameters") or c.get("rope_scaling")
    if positions is None or not isinstance(params, Mapping) or "gemma3" in str(c.get("model_type") or ""):
        return positions
    sets = list(params.values()) if params and all(isinstance(v, Mapping) for v in params.values()) else [params]
    window, factor = float(positions), 1.0
    for rp in sets:
        kind = str(rp.get("rope_type") or rp.get("type") or "default")
        if kind in _WINDOW_AS_STATED:
            continue
        value = rp.get("factor")
        factor = float(value) if isinstance(value, (int, float)) and value > 0 else factor
        original = rp.get("original_max_position_embeddings") or c.get("original_max_position_embeddings")
        if kind == "yarn" and isinstance(original, (int, float)) and original > 0:
            window = float(original)
    return int(window * factor)


def preflight(samples: Iterable[SampleLike], limits: EngineLimits) -> dict[str, str]:
    """``{sample_id: reason}`` for every sample that cannot run under ``limits``."""
    out: dict[str, str] = {}
    for s in samples:
        ids = getattr(s, "prompt_ids", None)  # built samples carry their ids; specs only the (exact) length
        n = len(ids) if ids else s.context_length
        reason = check(n, s.max_new_tokens, limits)
        if reason is not None:
            out[s.id] = reason
    return out
