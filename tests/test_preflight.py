"""Preflight: which samples an engine cannot run, each with a one-line reason that says what to change."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from evalctx.capacity.engine_config import load_engine_config
from evalctx.capacity.preflight import EngineLimits, check, limits_from_engine, preflight
from evalctx.records import Sample

ENGINES = Path(__file__).parent / "data" / "engines"


@dataclass
class Spec:
    id: str
    context_length: int
    max_new_tokens: int


def _sample(sid: str, n: int, new: int = 8) -> Sample:
    return Sample(id=sid, task="passkey", context_length=n, depth=0.5, seed=0, prompt="", prompt_ids=[5] * n,
                  target=["1"], needle_token_index=0, max_new_tokens=new)


def test_fits_everything():
    lim = EngineLimits(max_seq_len=1024, max_input_len=1000, max_num_tokens=256, kv_cache_tokens=2048,
                       tokens_per_block=64)
    assert check(900, 16, lim) is None


@pytest.mark.parametrize("prompt, new, limits, fragments", [
    # (a) prompt + new tokens beyond max_seq_len (TensorRT-LLM would lower max_new_tokens and cut the answer)
    (1010, 16, EngineLimits(max_seq_len=1024), ["max_seq_len is 1024", "--max_seq_len >= 1026", "lengths > 1008"]),
    (1009, 16, EngineLimits(max_seq_len=1024), ["--max_seq_len >= 1025"]),
    # (d) longer than the runtime's max input length
    (900, 8, EngineLimits(max_seq_len=4096, max_input_len=800), ["maximum input length 800", "lengths > 800"]),
    # (e) longer than a sliding attention window: early needles out of sight
    (995, 8, EngineLimits(max_seq_len=4096, attention_window=1000, sink_tokens=4),
     ["attention sees only the last 1000 tokens and its first 4 (sink tokens)", "lengths > 992"]),
    # (b) no paged context FMHA: chunked context cannot run at all
    (5000, 8, EngineLimits(max_num_tokens=4096, paged_context_fmha=False, chunked_context=True),
     ["no paged context FMHA", "--use_paged_context_fmha enable", "INT8 KV", "lengths > 4096"]),
    # (b) engine could, but chunked context is off
    (5000, 8, EngineLimits(max_num_tokens=4096, chunked_context=False),
     ["chunked context is off", "enable_chunked_context=true"]),
    # (c) KV cache smaller than the sequence: the window would shrink silently
    (1000, 30, EngineLimits(kv_cache_tokens=1024, tokens_per_block=64),
     ["needs 1088 KV-cache tokens", "shrink silently", "max_tokens_in_paged_kv_cache to >= 1088", "lengths > 994"]),
])
def test_reasons(prompt, new, limits, fragments):
    reason = check(prompt, new, limits)
    assert reason is not None and "\n" not in reason
    for f in fragments:
        assert f in reason, (f, reason)


def test_prompt_plus_budget_equal_to_max_seq_len_runs():
    """LlmRequest::validate accepts prompt + max_new_tokens == max_seq_len; only above it is the answer cut."""
    assert check(1016, 8, EngineLimits(max_seq_len=1024, max_input_len=1023)) is None
    assert check(992, 8, EngineLimits(max_seq_len=4096, attention_window=1000)) is None


def test_chunked_context_lifts_the_max_num_tokens_limit():
    assert check(100_000, 8, EngineLimits(max_num_tokens=4096, paged_context_fmha=True, chunked_context=True)) is None


def test_unknown_limits_are_skipped():
    assert check(10**7, 10**3, EngineLimits()) is None


def test_preflight_over_samples_and_specs():
    lim = EngineLimits(max_seq_len=2048, max_num_tokens=4096)
    samples = [_sample("ok", 1000), _sample("long", 2045)]
    assert set(preflight(samples, lim)) == {"long"}
    specs = [Spec("a", 2040, 8), Spec("b", 2041, 8)]  # the runner passes unbuilt specs: exact lengths only
    assert set(preflight(specs, lim)) == {"b"}


def test_limits_from_int8_kv_engine():
    engine = load_engine_config(ENGINES / "v0")  # INT8 KV cache, no paged context FMHA, max_num_tokens 4096
    lim = limits_from_engine(engine, max_input_len=2000, chunked_context=True, kv_cache_tokens=None)
    assert not lim.paged_context_fmha and lim.tokens_per_block == 64
    assert check(1500, 8, lim) is None
    assert "maximum input length 2000" in check(2100, 8, lim)
