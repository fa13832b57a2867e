"""The http backend against scripted loopback servers: retries, errors, streaming, request bodies, concurrency;
and end to end through the runner against `evalctx serve` with the fake backend."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from http_helpers import Reply, StubServer, completion, free_port, serving

from evalctx.backends.base import BackendContext, parse_options
from evalctx.backends.http_servers import PRESETS, detect
from evalctx.backends.openai_http import HTTPBackend
from evalctx.cli import main
from evalctx.errors import LengthError, UsageError
from evalctx.records import GenerationRequest
from evalctx.models.tokenizer import ByteTokenizer

SUITE = str(Path(__file__).parent / "data" / "suites" / "fake_small.toml")
TOK = ByteTokenizer()
PASSKEY = "Grass is green. The pass key is 68142. Remember it. Sky is blue. What is the pass key? The pass key is"


def backend(url: str, ctx_model: str | None = "stub-model", **opts: Any) -> HTTPBackend:
    options = parse_options(HTTPBackend, {"base_url": url, "backoff_s": "0.01", "server": "openai", **opts})
    return HTTPBackend(options, BackendContext(model=ctx_model, tokenizer=TOK))


def request(text: str = PASSKEY, max_new_tokens: int = 6, **kw: Any) -> GenerationRequest:
    return GenerationRequest(sample_id="s", prompt_ids=TOK.encode(text, add_special_tokens=True), prompt=text,
                             max_new_tokens=max_new_tokens, **kw)


def sse(*chunks: Any, done: bool = True, gap: float = 0.0) -> list[tuple[float, str]]:
    events = [(gap, json.dumps(c)) for c in chunks]
    return events + ([(0.0, "[DONE]")] if done else [])


def n_tokens(body: dict[str, Any]) -> int:
    """The prompt length a server with evalctx's byte tokenizer counts for a request body."""
    prompt = body["prompt"]
    return len(prompt) if isinstance(prompt, list) else len(TOK.encode(prompt, add_special_tokens=True))


def counted(text: str = " 42.", delta: int = 0, **kw: Any) -> Reply:
    """A JSON answer whose usage counts the request's prompt like the byte tokenizer (plus ``delta``)."""
    return Reply(body=lambda b: completion(text, prompt_tokens=n_tokens(b) + delta, **kw))


# ---------------------------------------------------------------------------------------------------------------
def test_503_twice_then_success_is_retried() -> None:
    stub = StubServer([Reply(503, {"error": {"message": "loading"}}), Reply(503, {"error": {"message": "loading"}}),
                       Reply(body=completion(" 68142.", prompt_tokens=len(request().prompt_ids)))])
    with stub.run() as url:
        res = backend(url, stream="false").generate([request()])[0]
    assert res.error is None and res.text == " 68142."
    assert len(stub.bodies) == 3
    assert res.n_prompt_tokens == len(request().prompt_ids) and res.n_output_tokens == 2
    assert res.ttft_s is None and res.latency_s is not None  # no stream, no TTFT


def test_429_is_retried_like_a_5xx() -> None:
    n = len(request().prompt_ids)
    stub = StubServer([Reply(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "0"}),
                       Reply(body=completion(" 1.", prompt_tokens=n))])
    with stub.run() as url:
        res = backend(url, stream="false").generate([request()])[0]
    assert res.error is None and res.text == " 1." and len(stub.bodies) == 2


def test_400_is_one_error_row_without_retry() -> None:
    msg = "This model's maximum context length is 4096 tokens.\nHowever, you requested 9000 tokens."
    stub = StubServer([Reply(400, {"error": {"message": msg, "type": "BadRequestError"}})])
    with stub.run() as url:
        results = backend(url).generate([request(), request()])
    assert len(stub.bodies) == 2  # one attempt each
    for res in results:
        assert res.text is None
        assert res.error.startswith("HTTP 400") and "maximum context length is 4096" in res.error
        assert "\n" not in res.error


def test_connection_refused_fails_after_retries_with_backoff() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    b = backend(url, retries="2", backoff_s="0.05")
    t0 = time.perf_counter()
    res = b.generate([request()])[0]
    elapsed = time.perf_counter() - t0
    assert res.text is None and "after 3 attempts" in res.error and "connection" in res.error
    assert elapsed >= 0.05 + 0.10  # two exponential waits


def test_timeout_is_an_error_row() -> None:
    stub = StubServer([Reply(body=completion(), delay_s=1.0)])
    with stub.run() as url:
        res = backend(url, retries="0", timeout_s="0.2", stream="false").generate([request()])[0]
    assert res.text is None and "timed out" in res.error


def test_streaming_ttft_is_first_token_not_role_chunk() -> None:
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    tok1 = {"choices": [{"index": 0, "delta": {"content": " 68"}, "finish_reason": None}]}
    tok2 = {"choices": [{"index": 0, "delta": {"content": "142."}, "finish_reason": "stop"}]}
    n = len(request().prompt_ids)
    usage = {"choices": [], "usage": {"prompt_tokens": n, "completion_tokens": 3}}
    stream = [(0.0, json.dumps(role)), (0.15, json.dumps(tok1)), (0.15, json.dumps(tok2)), (0.0, json.dumps(usage)),
              (0.0, "[DONE]")]
    stub = StubServer([Reply(sse=stream)])
    with stub.run() as url:
        res = backend(url, endpoint="chat").generate([request()])[0]
    assert res.error is None and res.text == " 68142." and res.finish_reason == "stop"
    assert res.ttft_s is not None and 0.14 <= res.ttft_s < res.latency_s
    assert res.latency_s >= 0.3
    assert res.n_prompt_tokens == n and res.n_output_tokens == 3
    assert stub.bodies[0]["stream"] is True and stub.bodies[0]["stream_options"] == {"include_usage": True}


def test_error_event_in_stream_is_an_error_row() -> None:
    stub = StubServer([Reply(sse=sse({"error": {"message": "engine died", "code": 500}}))])
    with stub.run() as url:
        res = backend(url).generate([request()])[0]
    assert res.text is None and "engine died" in res.error and len(stub.bodies) == 1


def test_request_body_fields_and_extra_body_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    extra = {"repetition_penalty": 1.0, "top_k": -1, "temperature": 0.0, "skip_special_tokens": False,
             "nested": {"a": [1, 2]}}
    stub = StubServer([counted()])
    with stub.run() as url:
        req = request(max_new_tokens=9)
        backend(url, extra_body=json.dumps(extra), add_special_tokens="false", stream="false").generate([req])
        backend(url, send="ids").generate([req])
        b = HTTPBackend(parse_options(HTTPBackend, {"base_url": url, "extra_body": extra}),
                        BackendContext(model="m", tokenizer=TOK))  # a suite-file table
        b.generate([req])
    first, ids, table = stub.bodies
    for k, v in extra.items():
        assert first[k] == v and table[k] == v
    assert first["model"] == "stub-model" and first["max_tokens"] == 9 and first["prompt"] == PASSKEY
    assert first["add_special_tokens"] is False and "stream" not in first
    assert ids["prompt"] == req.prompt_ids and "add_special_tokens" not in ids and ids["temperature"] == 0.0
    assert table["model"] == "m"
    assert stub.headers[0]["Authorization"] == "Bearer sk-test"


def test_chat_messages_and_assistant_prefill() -> None:
    messages = [{"role": "user", "content": "What is the pass key?"},
                {"role": "assistant", "content": "The pass key is"}]
    stub = StubServer([Reply(body=completion(" 5.", prompt_tokens=None, chat=True))])
    with stub.run() as url:
        b = backend(url, endpoint="chat", stream="false", verify_prompt="false")
        res = b.generate([request(extra={"messages": messages}), request()])
    assert [r.text for r in res] == [" 5.", " 5."]
    prefill, plain = sorted(stub.bodies, key=lambda b: len(b["messages"]), reverse=True)  # sent concurrently
    assert prefill["messages"] == messages
    assert prefill["continue_final_message"] is True and prefill["add_generation_prompt"] is False
    assert plain["messages"] == [{"role": "user", "content": PASSKEY}] and "continue_final_message" not in plain
    with pytest.raises(UsageError, match="chat-templated"):
        b.generate([request(prompt_mode="chat")])


def test_concurrency_is_bounded_and_order_kept() -> None:
    echo = Reply(body=lambda b: completion(b["prompt"].rsplit(" ", 1)[1], prompt_tokens=None), delay_s=0.1)
    stub = StubServer([echo])
    with stub.run() as url:
        reqs = [request(text=f"{PASSKEY} {i}") for i in range(6)]
        res = backend(url, concurrency="2", stream="false", verify_prompt="false").generate(reqs)
    assert stub.peak_in_flight == 2 and len(stub.bodies) == 6
    assert [r.text for r in res] == [str(i) for i in range(6)]  # results in request order
    assert all(r.error is None and r.batch_size == 2 and r.flags == ["unverified"] for r in res)


def test_model_from_server_and_info() -> None:
    stub = StubServer(models=["only-one"])
    with stub.run() as url:
        b = backend(url.removesuffix("/v1"), ctx_model=None, api_key="secret")
        assert b.model_name == "only-one" and b.base_url == url
        info = b.info()
    assert info["server_models"]["data"][0]["id"] == "only-one"
    assert info["options"]["api_key"] == "***" and "secret" not in json.dumps(info)
    two = StubServer(models=["a", "b"])
    with two.run() as url, pytest.raises(UsageError, match="model=NAME"):
        backend(url, ctx_model=None)


def test_bad_options() -> None:
    for opts, match in (({"endpoint": "embeddings"}, "endpoint"), ({"send": "tokens"}, "send"),
                        ({"endpoint": "chat", "send": "ids"}, "token ids"), ({"extra_body": "{oops"}, "JSON"),
                        ({"extra_body": "[1]"}, "JSON object"), ({"base_url": "localhost:8000"}, "base_url"),
                        ({"concurrency": "0"}, "concurrency"), ({"server": "tgi"}, "server must be")):
        with pytest.raises(UsageError, match=match):
            backend("http://127.0.0.1:1/v1", **opts)


# ---------------------------------------------------------------------------------------------------------------
# Faults seen against a real server (llama-cpp-python 0.3.36): none may give an ok row.

def test_stream_ended_without_finish_reason_is_retried_then_an_error_row() -> None:
    n = len(request().prompt_ids)
    cut = {"choices": [{"index": 0, "text": " the", "finish_reason": None}]}  # [DONE] follows: llama.cpp's cut
    whole = {"choices": [{"index": 0, "text": " 68142.", "finish_reason": "stop"}],
             "usage": {"prompt_tokens": n, "completion_tokens": 3}}
    stub = StubServer([Reply(sse=sse(cut)), Reply(sse=sse(whole))])
    with stub.run() as url:
        res = backend(url).generate([request()])[0]
    assert len(stub.bodies) == 2 and res.error is None and res.text == " 68142."
    always_cut = StubServer([Reply(sse=sse(cut))])
    with always_cut.run() as url:
        res = backend(url, retries="1", concurrency="4").generate([request(), request()])
    assert len(always_cut.bodies) == 4
    for r in res:
        assert r.text is None and "without a finish_reason" in r.error and "' the'" in r.error
        assert "concurrency=1" in r.error and "after 2 attempts" in r.error


def test_stream_broken_off_before_done_is_retried() -> None:
    part = {"choices": [{"index": 0, "text": " 1", "finish_reason": None}]}
    stub = StubServer([Reply(sse=sse(part, done=False))])
    with stub.run() as url:
        res = backend(url, retries="2").generate([request()])[0]
    assert len(stub.bodies) == 3 and "broke off before [DONE]" in res.error


def test_stream_cut_in_the_middle_of_an_event_is_retried_not_malformed() -> None:
    """A close-delimited stream whose connection closes mid-event leaves half a JSON chunk: a broken stream (retried),
    not a malformed answer (once a Fatal "bad SSE chunk", never retried)."""
    part = {"choices": [{"index": 0, "text": " 1", "finish_reason": None}]}
    stub = StubServer([Reply(sse=sse(part, done=False), raw=b'data: {"choices": [{"index": 0, "te')])
    with stub.run() as url:
        res = backend(url, retries="1").generate([request()])[0]
    assert len(stub.bodies) == 2 and "broke off in the middle of an event after 1 events" in res.error


def test_stream_without_usage_is_verified_by_the_same_request_without_streaming() -> None:
    chunks = [{"choices": [{"index": 0, "text": t, "finish_reason": None}]} for t in (" 68", "142.")]
    end = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
    stub = StubServer([Reply(sse=sse(*chunks, end, gap=0.05)), counted(" 68142.", completion_tokens=3)])
    with stub.run() as url:
        res = backend(url).generate([request()])[0]
    streamed, replay = stub.bodies
    assert streamed["stream"] is True and "stream" not in replay and "stream_options" not in replay
    assert {k: v for k, v in streamed.items() if not k.startswith("stream")} == replay
    assert res.error is None and res.text == " 68142." and res.flags == []
    assert res.n_prompt_tokens == len(request().prompt_ids) and res.n_output_tokens == 3
    assert res.ttft_s is not None and res.ttft_s >= 0.05  # TTFT from the stream, not from the replay


def test_replay_that_differs_from_the_stream_is_an_error() -> None:
    end = {"choices": [{"index": 0, "text": " 1.", "finish_reason": "stop"}]}
    stub = StubServer([Reply(sse=sse(end)), counted(" 2.")])
    with stub.run() as url:
        res = backend(url, retries="0").generate([request()])[0]
    assert res.text is None and "differs from the same request without streaming" in res.error


def test_no_usage_at_all_stops_the_run_unless_verification_is_off(capsys: pytest.CaptureFixture[str]) -> None:
    stub = StubServer([Reply(body=completion(" 1.", prompt_tokens=None))])
    with stub.run() as url:
        with pytest.raises(UsageError, match="verify_prompt=false"):
            backend(url, stream="false").generate([request()])
        res = backend(url, stream="false", verify_prompt="false").generate([request(), request()])
    assert all(r.error is None and r.text == " 1." and r.flags == ["unverified"] for r in res)
    assert capsys.readouterr().err.count("flagged 'unverified'") == 1  # said once, not silent
    from evalctx.records import FLAGS

    assert "unverified" in FLAGS


def test_answer_cut_by_the_server_context_is_an_error_row() -> None:
    """llama.cpp shortens max_tokens to fit its context and says only finish_reason "length"."""
    stub = StubServer([counted(" 681", completion_tokens=4, finish_reason="length")])
    with stub.run() as url:
        res = backend(url, stream="false").generate([request(max_new_tokens=8)])[0]
        whole = backend(url, stream="false").generate([request(max_new_tokens=4)])[0]
    assert res.text is None and "after 4 of max_tokens 8" in res.error and "context" in res.error
    assert len(stub.bodies) == 2  # not retried: it would be cut again
    assert whole.error is None and whole.finish_reason == "length"  # max_tokens reached: the budget, not a cut
    stub = StubServer([counted(" 681", completion_tokens=4, finish_reason="length")])
    with stub.run() as url:  # llama.cpp's context must be a multiple of 256 (docs/http.md): the advice says so
        res = backend(url, stream="false", server="llamacpp").generate([request(max_new_tokens=8)])[0]
    need = len(request().prompt_ids) + 8
    assert f"at least {need} tokens (--n_ctx 256: llama-cpp-python needs a multiple of 256)" in res.error


def test_empty_stream_gets_the_servers_own_refusal() -> None:
    """llama.cpp answers a prompt over its context with an empty 200 stream, and with a 400 without streaming."""
    refusal = {"error": {"message": "This model's maximum context length is 4352 tokens, however you requested "
                                    "8199 tokens", "type": "invalid_request_error", "code": "context_length_exceeded"}}
    stub = StubServer([Reply(sse=[]), Reply(400, refusal)])
    with stub.run() as url:
        res = backend(url).generate([request()])[0]
    assert res.text is None and res.error.startswith("HTTP 400") and "maximum context length is 4352" in res.error
    assert "empty answer" in res.error and len(stub.bodies) == 2


def test_trickling_server_is_cut_at_the_deadline() -> None:
    trickle = Reply(body=completion(" 68142." * 20), trickle_s=0.05)  # ~900 bytes: 45 s at this pace
    stub = StubServer([trickle])
    with stub.run() as url:
        t0 = time.perf_counter()
        res = backend(url, stream="false", timeout_s="0.5", retries="1").generate([request()])[0]
        elapsed = time.perf_counter() - t0
    assert res.text is None and "timed out after 0.5 s" in res.error and "after 2 attempts" in res.error
    assert elapsed < 2.5  # two attempts of 0.5 s and a backoff, not 2 x 45 s
    events = [(0.1, json.dumps({"choices": [{"index": 0, "text": "1", "finish_reason": None}]}))] * 50
    slow_stream = StubServer([Reply(sse=events)])
    with slow_stream.run() as url:
        t0 = time.perf_counter()
        res = backend(url, timeout_s="0.5", retries="0").generate([request()])[0]
        elapsed = time.perf_counter() - t0
    assert "timed out" in res.error and elapsed < 1.5


@pytest.mark.parametrize("reply, what", [
    (Reply(raw=b'{"choices": [{"text": " 1.", '), "non-JSON"),
    (Reply(body={"choices": [{"index": 0, "text": 68142, "finish_reason": "stop"}]}), "not a string"),
    (Reply(body={"choices": [{"index": 0, "message": {"content": ["x"]}, "finish_reason": "stop"}]}), "not a string"),
    (Reply(body={"choices": "none"}), "not a list"),
    (Reply(body=[1, 2]), "not an object"),
    (Reply(body={"choices": [{"index": 0, "text": " 1.", "finish_reason": "stop"}], "usage": {"prompt_tokens": "9"}}),
     "usage.prompt_tokens"),
    (Reply(body={"choices": [{"index": 0, "text": " 1.", "finish_reason": 1}]}), "finish_reason"),
    (Reply(sse=[(0.0, json.dumps({"choices": [{"index": 0, "text": {"t": 1}, "finish_reason": "stop"}]}))]),
     "not a string"),
])
def test_malformed_answers_are_error_rows_without_retry(reply: Reply, what: str) -> None:
    stub = StubServer([reply])
    with stub.run() as url:
        res = backend(url, stream="false").generate([request()])[0]
    assert res.text is None and what in res.error and len(stub.bodies) == 1


def test_finish_reason_that_is_not_a_whole_answer_is_retried() -> None:
    stub = StubServer([counted(" 1", finish_reason="abort"), counted(" 1.")])  # vLLM's word for a dropped request
    with stub.run() as url:
        res = backend(url, stream="false").generate([request()])[0]
    assert res.error is None and res.text == " 1." and len(stub.bodies) == 2


def test_500_validation_error_is_not_retried() -> None:
    """llama-cpp-python answers a prompt of token ids with HTTP 500 and pydantic's validation errors."""
    msg = "2 validation errors:\n  {'type': 'string_type', 'loc': ('body', 'prompt', 'str')}"
    stub = StubServer([Reply(500, {"error": {"message": msg, "type": "internal_server_error"}})])
    with stub.run() as url:
        res = backend(url, send="ids").generate([request()])[0]
    assert res.text is None and "validation errors" in res.error and "not retried" in res.error
    assert len(stub.bodies) == 1


@pytest.mark.parametrize("server, fields, absent", [
    ("llamacpp", {"repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}, "repetition_penalty"),
    ("vllm", {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}, "repeat_penalty"),
    ("sglang", {"repetition_penalty": 1.0}, "repeat_penalty"),
    ("trtllm", {"repetition_penalty": 1.0, "top_k": 1}, "repeat_penalty"),
    ("openai", {"frequency_penalty": 0.0, "presence_penalty": 0.0}, "repetition_penalty"),
])
def test_server_presets_send_the_greedy_fields_each_server_honours(server: str, fields: dict, absent: str) -> None:
    stub = StubServer([counted()])
    with stub.run() as url:
        b = backend(url, server=server, stream="false")
        b.generate([request()])
        info = b.info()
        backend(url, server=server, stream="false", extra_body='{"presence_penalty": 0.5}').generate([request()])
    sent, overridden = stub.bodies
    assert {k: sent[k] for k in fields} == fields and absent not in sent and sent["temperature"] == 0.0
    assert overridden["presence_penalty"] == 0.5  # the user's extra_body wins
    assert info["sampling"] == {"temperature": 0.0, **PRESETS[server].neutral}  # recorded in the manifest
    assert info["server"]["preset"] == server


def test_auto_recognises_the_server_and_warns_when_it_cannot(capsys: pytest.CaptureFixture[str]) -> None:
    for owned_by, preset in (("vllm", "vllm"), ("sglang", "sglang"), ("tensorrt_llm", "trtllm"),
                             ("evalctx", "evalctx")):
        with StubServer(owned_by=owned_by).run() as url:
            assert backend(url, server="auto").preset.name == preset
    assert "warning" not in capsys.readouterr().err
    with StubServer(owned_by="acme").run() as url:
        b = backend(url, server="auto")
    assert b.preset.name == "openai" and "not one evalctx knows" in capsys.readouterr().err
    facts = detect({"data": [{"id": "m", "owned_by": "me"}]}, {"info": {"title": "🦙 llama.cpp Python API",
                                                                        "version": "0.3.36"}})
    assert (facts.preset, facts.version) == ("llamacpp", "0.3.36")
    with pytest.raises(UsageError, match="did not answer"):
        backend(f"http://127.0.0.1:{free_port()}/v1", server="auto")


def test_llamacpp_preset_refuses_ids_and_runs_one_request_at_a_time() -> None:
    with pytest.raises(UsageError, match="text only"):
        backend("http://127.0.0.1:1/v1", server="llamacpp", send="ids")
    assert backend("http://127.0.0.1:1/v1", server="llamacpp").concurrency == 1
    assert backend("http://127.0.0.1:1/v1", server="vllm").concurrency == 4


def test_max_model_len_makes_samples_unsupported_before_any_request() -> None:
    from evalctx.run.sampling import SampleSpec

    stub = StubServer(owned_by="vllm")
    with stub.run() as url:
        b = backend(url, server="auto")
    b.facts.max_model_len = 1000
    specs = [SampleSpec(id=f"s{n}", task="passkey", context_length=n, depth=0.5, seed=0, max_new_tokens=8,
                        prompt_mode="raw", task_index=0) for n in (992, 993)]
    assert list(b.preflight(specs)) == ["s993"] and "max_model_len 1000" in b.preflight(specs)["s993"]


def test_length_mismatch_advice_follows_what_was_sent() -> None:
    chat_req = request(text="<|user|>\nWhat is the pass key?\n<|assistant|>\nThe pass key is", add_special_tokens=False)
    chat_req.prompt_ids = TOK.encode(chat_req.prompt)
    cases = [
        # a chat-templated prompt: add_special_tokens=false was sent and the server still added a BOS
        (chat_req, {}, 1, "although add_special_tokens=false was sent"),
        # the same prompt to llama.cpp (nothing sent about special tokens): it adds a BOS the template has none of
        (chat_req, {"server": "llamacpp"}, 1, "BOS token that --tokenizer's chat template does not start with; "
                                              "this server adds it whatever it is sent"),
        # a raw prompt whose ids start with the BOS the tokenizer adds: a BOS is not the question
        (request(), {}, 1, "splits the prompt text differently"),
        (request(), {}, -1, "add_special_tokens=true"),
        (request(), {"send": "ids"}, 2, "sent as token ids"),
    ]
    for req, opts, delta, match in cases:
        stub = StubServer([Reply(body=completion(prompt_tokens=len(req.prompt_ids) + delta))])
        with stub.run() as url, pytest.raises(LengthError, match=match) as err:
            backend(url, stream="false", **opts).generate([req])
        assert "add_special_tokens=false" not in str(err.value) or "was sent" in str(err.value)
    messages = [{"role": "user", "content": "What is the pass key?"}, {"role": "assistant", "content": "It is"}]
    stub = StubServer([Reply(body=completion(" 1.", prompt_tokens=len(request().prompt_ids) + 4, chat=True))])
    with stub.run() as url, pytest.raises(LengthError, match="continue_final_message") as err:
        backend(url, endpoint="chat", stream="false").generate([request(extra={"messages": messages})])
    assert "endpoint=completions" in str(err.value) and "tokenizer differs" not in str(err.value)
    stub = StubServer([Reply(body=completion(" 1.", prompt_tokens=len(request().prompt_ids) + 4, chat=True))])
    with stub.run() as url, pytest.raises(LengthError, match="with continue_final_message=false the server closes"
                                          ) as err:  # what was sent closes the prefix, whatever the template
        backend(url, endpoint="chat", stream="false", continue_final_message="false").generate(
            [request(extra={"messages": messages})])
    assert "template differs" not in str(err.value)


def test_label_defaults_to_the_served_model_name() -> None:
    with StubServer(models=["/models/llama-3.1-8b"]).run() as url:
        opts = parse_options(HTTPBackend, {"base_url": url})
        assert HTTPBackend.default_label(opts, None) == "llama-3.1-8b"
        assert HTTPBackend.default_label(opts, "given") == "given"


# ---------------------------------------------------------------------------------------------------------------
# Through the runner, against `evalctx serve` with the fake (oracle) backend.

def _fake_server(**fake_opts: Any) -> Any:
    from evalctx.backends.fake import FakeBackend
    from evalctx.serve import make_server

    fake = FakeBackend(parse_options(FakeBackend, fake_opts), BackendContext(tokenizer=TOK))
    return make_server(fake, TOK, "fake", port=0, quiet=True)


def run_http(tmp_path: Path, url: str, run_id: str, *opts: str) -> int:
    flags = [x for o in ("model=fake", f"base_url={url}", "backoff_s=0.01", *opts) for x in ("--backend-opt", o)]
    return main(["run", "--suite", SUITE, "--backend", "http", "--tokenizer", "byte", "--out", str(tmp_path),
                 "--run-id", run_id, "--no-progress", "--batch-size", "4", *flags])


def test_suite_through_http_matches_fake_direct(tmp_path: Path) -> None:
    assert main(["run", "--suite", SUITE, "--backend", "fake", "--tokenizer", "byte", "--out", str(tmp_path),
                 "--run-id", "direct", "--no-progress"]) == 0
    direct = pd.read_parquet(tmp_path / "direct" / "results.parquet").set_index("sample_id")
    with serving(_fake_server()) as url:
        assert run_http(tmp_path, url, "text") == 0
        assert run_http(tmp_path, url, "ids", "send=ids", "stream=false") == 0
    for run_id in ("text", "ids"):
        df = pd.read_parquet(tmp_path / run_id / "results.parquet").set_index("sample_id")
        assert len(df) == len(direct) > 0
        assert (df["status"] == "ok").all() and (df["score"] == 1.0).all()
        assert (df["n_prompt_tokens"] == df["context_length"]).all()
        assert df.loc[direct.index, "completion"].tolist() == direct["completion"].tolist()
        assert (df["backend"] == "http").all() and (df["latency_s"] > 0).all()
    text = pd.read_parquet(tmp_path / "text" / "results.parquet")
    assert text["ttft_s"].notna().all() and (text["ttft_s"] <= text["latency_s"]).all()
    manifest = json.loads((tmp_path / "text" / "manifest.json").read_text())
    assert manifest["backend"]["server_models"]["data"][0]["id"] == "fake"


def test_prompt_length_mismatch_stops_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serving(_fake_server(length_delta=3)) as url:
        assert run_http(tmp_path, url, "mismatch") == 2
    assert "prompt tokens" in capsys.readouterr().err


def test_server_errors_become_error_rows(tmp_path: Path) -> None:
    with serving(_fake_server(fail_every=3)) as url:  # the served fake fails every 3rd request -> HTTP 500
        code = run_http(tmp_path, url, "errs", "retries=0")
    df = pd.read_parquet(tmp_path / "errs" / "results.parquet")
    assert code == 3  # complete, with error rows: never green
    assert json.loads((tmp_path / "errs" / "manifest.json").read_text())["status"] == "complete_with_errors"
    errs = df[df["status"] == "error"]
    assert len(errs) > 0 and errs["score"].isna().all()
    assert errs["error"].str.contains("HTTP 500").all() and errs["error"].str.contains("injected error").all()
    assert (df.loc[df["status"] == "ok", "score"] == 1.0).all()


def test_chat_mode_through_the_chat_endpoint_renders_the_same_prompt(tmp_path: Path) -> None:
    """The runner hands the sample's messages to endpoint=chat; a server with the same chat template renders
    exactly our prompt (its usage.prompt_tokens matches) and the oracle finds every needle."""
    chat_tok = ByteTokenizer(chat=True)
    from evalctx.backends.fake import FakeBackend
    from evalctx.serve import make_server

    fake = FakeBackend(parse_options(FakeBackend, {}), BackendContext(tokenizer=chat_tok))
    with serving(make_server(fake, chat_tok, "fake", port=0, quiet=True)) as url:
        flags = [x for o in ("model=fake", f"base_url={url}", "backoff_s=0.01", "endpoint=chat")
                 for x in ("--backend-opt", o)]
        code = main(["run", "--suite", SUITE, "--backend", "http", "--tokenizer", "byte-chat", "--out",
                     str(tmp_path), "--run-id", "chat", "--no-progress", "--prompt-mode", "chat", *flags])
    assert code == 0
    df = pd.read_parquet(tmp_path / "chat" / "results.parquet")
    assert (df["status"] == "ok").all() and (df["score"] == 1.0).all()
    assert (df["n_prompt_tokens"] == df["context_length"]).all()


def test_credentials_in_base_url_go_as_basic_auth() -> None:
    """A gateway URL with user:pass@ used to fail with "Name or service not known" (the credentials went into
    the host name); they are sent as Basic auth, and never appear in the backend's recorded base_url."""
    import base64

    req = request()
    stub = StubServer([Reply(body=completion(prompt_tokens=len(req.prompt_ids)))])
    with serving(stub.server) as url:
        host = url.split("://", 1)[1]
        b = backend(f"http://alice:s%3Acret@{host}")
        res = b.generate([req])
    assert res[0].error is None, res[0].error
    assert stub.headers[-1]["Authorization"] == "Basic " + base64.b64encode(b"alice:s:cret").decode()
    assert "s%3Acret" not in b.base_url and "s%3Acret" not in json.dumps(b.info())


def test_answers_bounded_counts_checked_sse_read_as_specified_redirects_named() -> None:
    """Issue 23, kind 8: an endless answer grew to gigabytes; a completion count of 10^9 for a 6-token budget was
    stored; an event whose data spans two ``data:`` lines became an error row; a redirect said "non-JSON: "."""
    from evalctx.backends import http_client

    n = len(TOK.encode(PASSKEY, add_special_tokens=True))
    split = [(0.0, '{"choices": [{"text": " 12", "index": 0,\ndata: "finish_reason": null}]}'),
             (0.0, '{"choices": [{"text": "345.", "index": 0, "finish_reason": "stop"}], '
                   f'"usage": {{"prompt_tokens": {n}, "completion_tokens": 2}}}}'), (0.0, "[DONE]")]
    cases = [
        (Reply(sse=split), "true", None, " 12345."),
        (counted(completion_tokens=10 ** 9), "false", "reports 1000000000 completion tokens for max_tokens 6", None),
        (Reply(status=302, body={}, headers={"Location": "https://elsewhere/v1/completions"}), "false",
         "redirects to https://elsewhere/v1/completions; pass base_url=https://elsewhere/v1", None),
        (Reply(raw=b""), "false", "non-JSON: (an empty body)", None),
    ]
    for reply, stream, error, text in cases:
        with StubServer([reply]).run() as url:
            res = backend(url, stream=stream, retries="0").generate([request()])[0]
        assert (res.error is None) if error is None else (error in (res.error or "")), (res.error, error)
        if text is not None:
            assert res.text == text
    old = http_client.MAX_ANSWER_BYTES
    http_client.MAX_ANSWER_BYTES = 1000
    try:
        with StubServer([Reply(raw=b"x" * 5000)]).run() as url:
            res = backend(url, stream="false", retries="0").generate([request()])[0]
        assert "grew past" in res.error
    finally:
        http_client.MAX_ANSWER_BYTES = old
