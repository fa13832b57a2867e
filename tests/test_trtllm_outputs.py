"""Executor outputs to rows: timers as the binding may hand them over, end ids, and the model's end-id list."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from evalctx.backends.trtllm.outputs import Timing, default_end_ids, engine_timing, is_fatal, strip_end, to_result
from evalctx.records import GenerationRequest
from evalctx.models.tokenizer import ByteTokenizer


def perf(arrival, first, last, reused=0):
    return SimpleNamespace(timing_metrics=SimpleNamespace(arrival_time=arrival, first_token_time=first,
                                                          last_token_time=last),
                           kv_cache_metrics=SimpleNamespace(num_reused_blocks=reused))


@pytest.mark.parametrize("base", [timedelta(seconds=5000), datetime(2026, 1, 1, tzinfo=timezone.utc)])
def test_executor_timers_as_timedelta_or_datetime(base):
    t = engine_timing(perf(base, base + timedelta(seconds=1.5), base + timedelta(seconds=1.75)), block_reuse=False)
    assert (t.ttft_s, t.latency_s, t.n_cached_prompt_tokens, t.flags) == (1.5, 1.75, 0, ())


def test_unset_or_inconsistent_timers_are_not_used():
    zero = timedelta(0)
    assert engine_timing(perf(zero, zero, zero), block_reuse=False) is None  # not filled in: the clock's epoch
    later = timedelta(seconds=10)
    assert engine_timing(perf(later, later - timedelta(seconds=1), later), block_reuse=False) is None
    assert engine_timing(None, block_reuse=False) is None


def test_reused_blocks_make_the_cached_count_unknown():
    p = perf(timedelta(seconds=1), timedelta(seconds=2), timedelta(seconds=3), reused=3)
    assert engine_timing(p, block_reuse=True).flags == ("kv_cache_reuse",)
    assert engine_timing(p, block_reuse=True).n_cached_prompt_tokens is None


def test_strip_end_and_finish_reasons():
    assert strip_end([5, 6, 2], "END_ID", [2, 9], 8) == ([5, 6], "stop")
    assert strip_end([5, 6, 9], "STOP_WORDS", [2, 9], 8) == ([5, 6], "stop")
    assert strip_end([5, 6], "END_ID", [2], 8) == ([5, 6], "stop")  # a release that drops the end id itself
    assert strip_end([5, 6, 7], "LENGTH", [2], 3) == ([5, 6, 7], "length")


@pytest.mark.parametrize("tokens, finish, ok", [
    ([5, 6, 2], "END_ID", True), ([5, 6, 7], "LENGTH", True), ([5, 6, 7], None, True), ([5, 2], "CANCELLED", True),
    ([5, 6], "TIMED_OUT", False), ([5, 6], "CANCELLED", False), ([5], "NOT_FINISHED", False), ([5], None, False),
    ([5, 6], "timeout", False),  # the LLM API's name
    ([5, 6], "LENGTH", False),  # the runtime lowered max_new_tokens (prompt + budget > max_seq_len): cut
])
def test_an_answer_cut_before_an_end_id_or_the_budget_is_an_error_row(tokens, finish, ok):
    req = GenerationRequest(sample_id="s", prompt_ids=[1, 2, 3], prompt="abc", max_new_tokens=3)
    res = to_result(req, tokens, finish, Timing(0.1, 0.2, 0), tokenizer=ByteTokenizer(), end_ids=[2], batch_size=1)
    assert (res.error is None) == ok and (res.text is not None) == ok
    if not ok:
        assert f"finish reason {finish or 'none'}" in res.error and res.latency_s == 0.2


def test_end_ids_from_generation_config(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    assert default_end_ids(tok, tmp_path) == [128001, 128009, 2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert default_end_ids(tok, tmp_path) == [7, 2] and default_end_ids(tok) == [2]


def test_fatal_errors():
    assert is_fatal("CUDA runtime error in cudaMemcpy") and is_fatal(MemoryError())
    assert not is_fatal("Prompt length (9) exceeds maximum input length (8).")
