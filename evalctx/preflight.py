"""Which samples an engine cannot run, decided from its configuration before any GPU work.

A sample that cannot run correctly must never reach the engine: TensorRT-LLM either rejects it mid-run, or, worse,
runs it wrong without an error (a KV cache smaller than the sequence shrinks the attention window, and a needle
near the start is then silently out of sight). The runner marks these samples ``unsupported``: not run, not
scored. Each reason is one line that says what to change.

The logic is pure (numbers in, reasons out) so every backend with engine-like limits can reuse it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Protocol

from evalctx.engine_config import EngineConfig


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
    """Tokens attended to (a sliding window, e.g. TensorRT-LLM's max_attention_window_size); None = all."""
    sink_tokens: int = 0
    """Leading tokens kept in view beyond a sliding window (StreamingLLM sink tokens)."""


def limits_from_engine(engine: EngineConfig, *, max_input_len: int | None, chunked_context: bool,
                       kv_cache_tokens: int | None) -> EngineLimits:
    """Limits of a TensorRT-LLM engine as it will be loaded (runtime values passed in by the backend)."""
    return EngineLimits(
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
    if limits.attention_window is not None and need > limits.attention_window:
        w = limits.attention_window
        return (
            f"prompt {p} + max_new_tokens {g} = {need} tokens but the attention window is {w} tokens (with "
            f"{limits.sink_tokens} sink tokens): tokens further back are not attended to, so early needles would be "
            f"out of sight; raise the window to >= {need} (or leave it unset) or drop lengths > {max(0, w - g)}"
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
