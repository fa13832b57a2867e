"""A sample's outcome as a results row: scored, flagged (short budget, beyond the trained window), its throughput
computed from the tokens the prefill really computed, secrets masked; and the row of a sample the backend cannot
run (``unsupported``, with the reason)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from evalctx import redact
from evalctx.capacity.preflight import EngineLimits, window_flags
from evalctx.records import GenerationResult, Sample, SampleRecord
from evalctx.run.sampling import SampleSpec
from evalctx.tasks.scoring import get_scorer


def short_budget(sample: Sample, res: GenerationResult) -> bool:
    """The budget cannot hold this sample's answer and the output was not stopped by the model (EOS) before it."""
    need = sample.meta.get("answer_tokens")
    return isinstance(need, int) and sample.max_new_tokens < need and res.finish_reason != "stop"


def make_record(run_id: str, sample: Sample, res: GenerationResult, replica: int, extra: dict[str, Any],
                limits: EngineLimits | None = None) -> dict:
    status = "error" if res.error is not None or res.text is None else "ok"
    flags = list(res.flags)
    if status == "ok":
        flags += ["short_budget"] if short_budget(sample, res) else []
        flags += window_flags(len(sample.prompt_ids), sample.max_new_tokens, limits)
    sc = get_scorer(sample.scorer)(res.text, sample.target) if status == "ok" else None
    # Tokens the prefill computed: a warm row's TTFT timed only the suffix after its cached prefix, so the whole
    # prompt over that time would read as a prefill several times faster than the model's.
    computed = len(sample.prompt_ids) - (res.n_cached_prompt_tokens or 0)
    prefill_tps = computed / res.ttft_s if res.ttft_s else None
    decode_tps = None
    # Decode steps: every generated token after the first, prefill's; an answer that stopped on EOS took one more
    # step for that EOS, which n_output_tokens does not count.
    steps = (res.n_output_tokens or 0) - 1 + (res.finish_reason == "stop")
    if res.latency_s and res.ttft_s is not None and steps > 0 and res.latency_s > res.ttft_s:
        decode_tps = steps / (res.latency_s - res.ttft_s)
    meta = {f"meta_{k}": v for k, v in sample.meta.items() if isinstance(v, (str, int, float, bool))}
    rec = SampleRecord(
        run_id=run_id, sample_id=sample.id, task=sample.task, context_length=sample.context_length,
        depth=sample.depth, depth_actual=sample.depth_actual, seed=sample.seed, prompt_mode=sample.prompt_mode,
        needle_token_index=sample.needle_token_index, target=list(sample.target),
        completion=None if res.text is None else redact.mask_text(res.text),
        extracted=sc.extracted if sc else None, score=sc.value if sc else None, status=status,
        n_prompt_tokens=res.n_prompt_tokens, n_output_tokens=res.n_output_tokens, latency_s=res.latency_s,
        ttft_s=res.ttft_s, prefill_tokens_per_s=prefill_tps, decode_tokens_per_s=decode_tps,
        batch_size=res.batch_size, finish_reason=res.finish_reason, peak_memory_bytes=res.peak_memory_bytes,
        error=None if res.error is None else redact.mask_text(res.error),
        prompt_sha1=hashlib.sha1(sample.prompt.encode("utf-8")).hexdigest(),
        scorer=sample.scorer, max_new_tokens=sample.max_new_tokens, replica=replica, finished_at=time.time(),
        n_cached_prompt_tokens=res.n_cached_prompt_tokens, flags=flags, task_type=sample.task_type,
        task_options=sample.task_options, extra={**extra, **meta},
    )
    return rec.to_row()


def unsupported_record(run_id: str, spec: SampleSpec, reason: str, extra: dict[str, Any]) -> dict:
    rec = SampleRecord(
        run_id=run_id, sample_id=spec.id, task=spec.task, context_length=spec.context_length, depth=spec.depth,
        depth_actual=None, seed=spec.seed, prompt_mode=spec.prompt_mode, needle_token_index=-1, target=[],
        completion=None, extracted=None, score=None, status="unsupported", n_prompt_tokens=None,
        n_output_tokens=None, latency_s=None, ttft_s=None, prefill_tokens_per_s=None, decode_tokens_per_s=None,
        batch_size=None, finish_reason=None, peak_memory_bytes=None, error=reason, prompt_sha1="", scorer="",
        max_new_tokens=spec.max_new_tokens, replica=-1, finished_at=time.time(), task_type=spec.task_type,
        task_options=spec.task_options, extra=dict(extra),
    )
    return rec.to_row()
