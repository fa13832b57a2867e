"""From TensorRT-LLM outputs to :class:`GenerationResult`: end ids, finish reasons and the executor's own timers.

Shared by the engine backend (C++ executor) and the LLM-API backend, which return the same ``RequestPerfMetrics``
(``tensorrt_llm.bindings.executor``; the LLM API's ``CompletionOutput.request_perf_metrics`` is the executor's,
``tensorrt_llm/executor/result.py``). Its ``timing_metrics`` are steady-clock time points: ``arrival_time`` (set
at enqueue), ``first_scheduled_time``, ``first_token_time``, ``last_token_time``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from evalctx.records import GenerationRequest, GenerationResult

# Errors after which the executor's CUDA state cannot be trusted: they end the run instead of becoming error rows.
FATAL_MARKERS = ("cuda error", "cudaerror", "cuda runtime error", "illegal memory access", "out of memory",
                 "nccl", "cublas", "device-side assert", "unspecified launch failure", "ecc error")
FLAG_HOST_TIMING = "host_timing"
FLAG_KV_REUSE = "kv_cache_reuse"
_STOPPED = {"END_ID", "STOP_WORDS", "stop"}
_LENGTH = {"LENGTH", "length"}


@dataclass(frozen=True)
class Timing:
    """Per-request timings in seconds, and what the numbers include."""

    ttft_s: float | None
    latency_s: float | None
    n_cached_prompt_tokens: int | None
    flags: tuple[str, ...] = field(default=())


def is_fatal(error: BaseException | str) -> bool:
    """CUDA, NCCL and out-of-memory errors: the process state is suspect, so they end the run."""
    if isinstance(error, MemoryError) or "OutOfMemory" in type(error).__name__:
        return True
    return any(m in str(error).lower() for m in FATAL_MARKERS)


def one_line(error: BaseException | str) -> str:
    """The first line of an error, with the exception type when there is one."""
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    lines = text.strip().splitlines()
    return lines[0] if lines else "error without a message"


def _seconds(delta: Any) -> float:
    """A difference of two binding time points (``datetime.timedelta``) or plain seconds, as float seconds."""
    return float(delta.total_seconds()) if hasattr(delta, "total_seconds") else float(delta)


def _is_set(point: Any) -> bool:
    """An unset C++ time point is the clock's epoch: zero as a timedelta, 1970 as a datetime, 0 as a number."""
    if hasattr(point, "timestamp"):
        return point.timestamp() > 0
    return _seconds(point) > 0


def engine_timing(perf: Any, *, block_reuse: bool) -> Timing | None:
    """TTFT = first_token - arrival (queue + prefill) and latency = last_token - arrival, from the executor's
    timers; None when ``perf`` is missing or its time points were not filled in.

    The binding hands steady-clock time points over as ``timedelta`` (datetime for a system clock); only their
    differences are used, as TensorRT-LLM's own tests do.
    """
    tm = getattr(perf, "timing_metrics", None)
    if tm is None:
        return None
    try:
        arrival, first, last = tm.arrival_time, tm.first_token_time, tm.last_token_time
        if not all(_is_set(t) for t in (arrival, first, last)):
            return None
        ttft, latency = _seconds(first - arrival), _seconds(last - arrival)
    except (AttributeError, TypeError, ValueError):
        return None
    if not 0 <= ttft <= latency:
        return None
    reused = getattr(getattr(perf, "kv_cache_metrics", None), "num_reused_blocks", None)
    if not block_reuse or reused == 0:
        cached, flags = 0, ()
    else:
        # Reused blocks may be partly filled (partial reuse): their count times the block size is not the number of
        # prompt tokens that skipped prefill, so the count is unknown; the flag says why.
        cached, flags = None, ((FLAG_KV_REUSE,) if reused else ())
    return Timing(ttft, latency, cached, flags)


def host_timing(latency_s: float | None, first_token_s: float | None, *, block_reuse: bool) -> Timing:
    """Host wall-clock timings, for releases without perf metrics; flagged, since they include host overhead."""
    return Timing(first_token_s, latency_s, None if block_reuse else 0, (FLAG_HOST_TIMING,))


def strip_end(tokens: Sequence[int], finish: str | None, end_ids: Sequence[int],
              max_new_tokens: int) -> tuple[list[int], str | None]:
    """Generated ids without a trailing end id or one-token stop word, and the finish reason (stop or length)."""
    out = [int(t) for t in tokens]
    if out and out[-1] in end_ids:
        return out[:-1], "stop"
    if finish in _STOPPED:
        return out, "stop"
    if finish in _LENGTH or len(out) >= max_new_tokens:
        return out, "length"
    return out, (finish.lower() if finish else None)


def to_result(req: GenerationRequest, tokens: Sequence[int], finish: str | None, timing: Timing, *,
              tokenizer: Any, end_ids: Sequence[int], batch_size: int) -> GenerationResult:
    """An ``ok`` result, or an error result when the answer is known to be cut: the generation ended without an end
    id and before ``max_new_tokens`` (finish reason TIMED_OUT, CANCELLED, NOT_FINISHED or none, or LENGTH with fewer
    tokens, which is the runtime lowering the budget: LlmRequest::validate). The caller turns error responses into
    error results before this."""
    gen, reason = strip_end(tokens, finish, end_ids, req.max_new_tokens)
    if reason not in ("stop", "length") or (reason == "length" and len(gen) < req.max_new_tokens):
        return error_result(req, f"the answer ended after {len(gen)} of max_new_tokens {req.max_new_tokens} tokens "
                                 f"without an end id (finish reason {finish or 'none'}): it is cut, not scored",
                            batch_size, timing.latency_s)
    return GenerationResult(text=tokenizer.decode(gen), n_prompt_tokens=len(req.prompt_ids), n_output_tokens=len(gen),
                            latency_s=timing.latency_s, ttft_s=timing.ttft_s, batch_size=batch_size,
                            finish_reason=reason, n_cached_prompt_tokens=timing.n_cached_prompt_tokens,
                            flags=list(timing.flags))


def error_result(req: GenerationRequest, message: str, batch_size: int,
                 latency_s: float | None = None) -> GenerationResult:
    return GenerationResult(text=None, n_prompt_tokens=len(req.prompt_ids), batch_size=batch_size, error=message,
                            latency_s=latency_s)


def run_checked(batch: Sequence[GenerationRequest], check: Callable[[GenerationRequest], str | None],
                run_group: Callable[[list[GenerationRequest]], list[GenerationResult]],
                group_size: int) -> list[GenerationResult]:
    """One result per request, in order: a request ``check`` refuses is its error row (never sent, never cut); the
    rest go to ``run_group`` in groups of at most ``group_size``."""
    results: list[GenerationResult | None] = [None] * len(batch)
    runnable = []
    for i, req in enumerate(batch):
        err = check(req)
        if err:
            results[i] = error_result(req, err, len(batch))
        else:
            runnable.append(i)
    size = max(1, group_size)
    for start in range(0, len(runnable), size):
        group = runnable[start:start + size]
        for i, res in zip(group, run_group([batch[i] for i in group])):
            results[i] = res
    done = [r for r in results if r is not None]
    assert len(done) == len(batch), "every request gets exactly one result"
    return done


def default_end_ids(tokenizer: Any, model_dir: str | Path | None = None) -> list[int]:
    """Every id that ends an answer: ``eos_token_id`` of the model's generation_config.json (an int or a list, e.g.
    Llama-3-Instruct's <|end_of_text|> and <|eot_id|>) and the tokenizer's EOS. Empty when none is known."""
    ids: list[int] = []
    for folder in (model_dir, getattr(tokenizer, "path", None)):
        file = Path(folder) / "generation_config.json" if folder else None
        if file is not None and file.is_file():
            try:
                eos = json.loads(file.read_text()).get("eos_token_id")
            except (OSError, ValueError, AttributeError):
                eos = None
            ids.extend(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.append(eos)
    return list(dict.fromkeys(int(i) for i in ids))


def default_pad_id(tokenizer: Any, end_ids: Sequence[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(tokenizer, "hf", None), "pad_token_id", None)
    return int(end_ids[0] if pad is None else pad)
