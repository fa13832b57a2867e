"""n_cached_prompt_tokens from servers that report their prefix cache: ``usage.prompt_tokens_details.cached_tokens``
(vLLM --enable-prompt-tokens-details, SGLang --enable-cache-report, trtllm-serve, newer llama.cpp) and llama.cpp's
``timings.cache_n``, in JSON answers and streams; nothing invented where a server says nothing."""

from __future__ import annotations

from typing import Any

from http_helpers import Reply, StubServer, completion
from test_http_backend import backend, request, sse

N = len(request().prompt_ids)


def _answer(**extra: Any) -> dict[str, Any]:
    d = completion(" 68142.", prompt_tokens=N, completion_tokens=3)
    for key, value in extra.items():
        if key == "details":
            d["usage"]["prompt_tokens_details"] = value
        else:
            d[key] = value
    return d


def _one(*replies: Reply, **opts: Any) -> Any:
    stub = StubServer(list(replies))
    with stub.run() as url:
        return backend(url, **opts).generate([request()])[0]


def test_usage_cached_tokens_are_recorded() -> None:
    res = _one(Reply(body=_answer(details={"cached_tokens": 64})), stream="false")
    assert res.error is None and res.n_cached_prompt_tokens == 64


def test_llama_server_timings_cache_n_is_recorded() -> None:
    # llama-server: a top-level "timings" object with cache_n (reused) and prompt_n (computed) in every answer.
    res = _one(Reply(body=_answer(timings={"cache_n": 80, "prompt_n": N - 80, "prompt_ms": 1.5})), stream="false")
    assert res.error is None and res.n_cached_prompt_tokens == 80
    both = _one(Reply(body=_answer(details={"cached_tokens": 48}, timings={"cache_n": 80})), stream="false")
    assert both.n_cached_prompt_tokens == 48  # the OpenAI field wins where both are sent


def test_nothing_reported_is_unknown_not_zero() -> None:
    res = _one(Reply(body=_answer()), stream="false")
    assert res.error is None and res.n_cached_prompt_tokens is None


def test_stream_takes_the_last_chunks_timings() -> None:
    tok = {"choices": [{"index": 0, "text": " 68142.", "finish_reason": None}]}
    end = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}], "timings": {"cache_n": 96, "prompt_n": 5}}
    usage = {"choices": [], "usage": {"prompt_tokens": N, "completion_tokens": 3}}
    res = _one(Reply(sse=sse(tok, end, usage)))
    assert res.error is None and res.n_cached_prompt_tokens == 96


def test_stream_verified_by_replay_keeps_the_streams_own_count() -> None:
    """A stream without usage is verified by a replay, which the server answers from the cache the stream just
    filled: its count is not the stream's; the stream's own timings are."""
    tok = {"choices": [{"index": 0, "text": " 68142.", "finish_reason": "stop"}], "timings": {"cache_n": 16}}
    replay = Reply(body=lambda b: _answer(timings={"cache_n": N - 1}))
    assert _one(Reply(sse=sse(tok)), replay).n_cached_prompt_tokens == 16
    plain = {"choices": [{"index": 0, "text": " 68142.", "finish_reason": "stop"}]}
    assert _one(Reply(sse=sse(plain)), replay).n_cached_prompt_tokens is None


def test_impossible_counts_are_error_rows() -> None:
    res = _one(Reply(body=_answer(details={"cached_tokens": N + 1})), stream="false")
    assert res.text is None and f"{N + 1} cached prompt tokens of a {N}-token prompt" in res.error
    bad = _one(Reply(body=_answer(timings={"cache_n": "12"})), stream="false")
    assert bad.text is None and "timings.cache_n is '12', not a token count" in bad.error



def test_a_server_that_never_reports_its_cache_is_named_at_close(capsys: Any) -> None:
    """vLLM and SGLang cache prefixes by default but say so only behind a flag: rows sent in prefix order may be
    warm while their n_cached_prompt_tokens is unknown, and timed as cold. The run says it once, at the end."""
    for details, warned in ((None, True), ({"cached_tokens": 0}, False)):
        body = _answer(details=details) if details else _answer()
        stub = StubServer([Reply(body=body), Reply(body=body)])
        with stub.run() as url:
            b = backend(url, stream="false")
            assert [r.error for r in b.generate([request(), request()])] == [None, None]
            capsys.readouterr()
            b.close()
        err = capsys.readouterr().err
        assert ("reported no cached prompt tokens in any of 2 answers" in err) is warned, err
        assert not warned or "--enable-prompt-tokens-details" in err
