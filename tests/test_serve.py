"""`evalctx serve`: the OpenAI-compatible endpoints, their errors, and the key check that the hf backend gives the
same greedy answers directly and through serve + the http backend (completions, text and ids)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from http_helpers import serving

from evalctx.backends.base import BackendContext, parse_options
from evalctx.backends.fake import FakeBackend
from evalctx.cli import build_parser, main
from evalctx.records import GenerationRequest
from evalctx.serve import make_server
from evalctx.models.tokenizer import ByteTokenizer

SUITE = str(Path(__file__).parent / "data" / "suites" / "fake_small.toml")
PASSKEY = "Grass is green. The pass key is 68142. Remember it. Sky is blue. What is the pass key? The pass key is"


class CountingFake(FakeBackend):
    """Records how many generate calls overlap (the server's lock must keep it at 1)."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.active = 0
        self.peak = 0
        self.guard = threading.Lock()
        self.seen: list[GenerationRequest] = []

    def generate(self, batch: Any) -> Any:
        with self.guard:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.seen.extend(batch)
        try:
            return super().generate(batch)
        finally:
            with self.guard:
                self.active -= 1


def fake_server(tok: Any = None, **opts: Any) -> Any:
    tok = tok or ByteTokenizer()
    backend = CountingFake(parse_options(CountingFake, opts), BackendContext(tokenizer=tok))
    return make_server(backend, tok, "fake", port=0, quiet=True)


def call(url: str, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any, str]:
    host = url.split("//")[1].split("/")[0]
    conn = http.client.HTTPConnection(host, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    resp = conn.getresponse()
    text = resp.read().decode()
    ctype = resp.getheader("Content-Type") or ""
    conn.close()
    return resp.status, (json.loads(text) if "json" in ctype else text), ctype


def sse_events(text: str) -> list[Any]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            d = line[6:]
            out.append(d if d == "[DONE]" else json.loads(d))
    return out


# ---------------------------------------------------------------------------------------------------------------
def test_models_health_and_completions() -> None:
    server = fake_server()
    with serving(server) as url:
        assert call(url, "GET", "/health")[:2] == (200, {"status": "ok"})
        status, models, _ = call(url, "GET", "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["fake"]
        status, ans, _ = call(url, "POST", "/v1/completions", {"model": "fake", "prompt": PASSKEY, "max_tokens": 5,
                                                               "temperature": 0})
        assert status == 200 and ans["object"] == "text_completion"
        assert ans["choices"][0]["text"] == " 68142." and ans["choices"][0]["finish_reason"] == "stop"
        n = len(PASSKEY) + 1  # bytes + BOS (add_special_tokens defaults to true for text)
        assert ans["usage"]["prompt_tokens"] == n and ans["usage"]["total_tokens"] == n + ans["usage"][
            "completion_tokens"]
        ids = ByteTokenizer().encode(PASSKEY, add_special_tokens=True)
        status, by_ids, _ = call(url, "POST", "/v1/completions", {"prompt": ids, "max_tokens": 5})
        assert status == 200 and by_ids["choices"][0]["text"] == " 68142." and by_ids["usage"]["prompt_tokens"] == n
        _, no_bos, _ = call(url, "POST", "/v1/completions", {"prompt": PASSKEY, "add_special_tokens": False})
        assert no_bos["usage"]["prompt_tokens"] == n - 1
    seen = server.RequestHandlerClass.model_server.backend.seen
    assert seen[0].prompt_ids == ids and seen[0].max_new_tokens == 5 and seen[2].prompt_ids == ids[1:]
    assert seen[2].max_new_tokens == 16  # OpenAI's default max_tokens


def test_streaming_sends_chunks_after_the_first_token() -> None:
    with serving(fake_server(delay_s=0.2)) as url:
        host = url.split("//")[1].split("/")[0]
        conn = http.client.HTTPConnection(host, timeout=30)
        body = {"prompt": PASSKEY, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = resp.readline()
        t_first = time.perf_counter() - t0
        rest = resp.read().decode()
        conn.close()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    assert t_first >= 0.2  # nothing (not even headers) before generation produced the tokens
    events = sse_events(first.decode() + rest)
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in events[:-1] if c["choices"])
    assert text == " 68142."
    assert [c["choices"][0]["finish_reason"] for c in events[:-1] if c["choices"]][-1] == "stop"
    usage = [c for c in events[:-1] if not c["choices"]]
    assert len(usage) == 1 and usage[0]["usage"]["prompt_tokens"] == len(PASSKEY) + 1


def test_chat_template_and_prefill() -> None:
    tok = ByteTokenizer(chat=True)
    server = fake_server(tok)
    msgs = [{"role": "user", "content": PASSKEY}]
    with serving(server) as url:
        status, ans, _ = call(url, "POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 5})
        assert status == 200 and ans["object"] == "chat.completion"
        assert ans["choices"][0]["message"] == {"role": "assistant", "content": " 68142."}
        prefill = [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "The answer"}]
        status, _, _ = call(url, "POST", "/v1/chat/completions",
                            {"messages": prefill, "continue_final_message": True, "add_generation_prompt": False})
        assert status == 200
        status, streamed, _ = call(url, "POST", "/v1/chat/completions", {"messages": msgs, "stream": True})
        assert status == 200
        events = sse_events(streamed)
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == " 68142."
        status, err, _ = call(url, "POST", "/v1/chat/completions", {"messages": msgs, "continue_final_message": True})
        assert status == 400 and "final assistant message" in err["error"]["message"]
    seen = server.RequestHandlerClass.model_server.backend.seen
    assert seen[0].prompt == tok.apply_chat_template(msgs)
    assert seen[0].prompt_ids == tok.encode(seen[0].prompt)  # no BOS added to a templated chat by default
    assert seen[1].prompt == "<|user|>\nSay it.\n<|assistant|>\nThe answer"


@pytest.mark.parametrize("body,status,needle", [
    ({"prompt": "x", "temperature": 0.7}, 400, "temperature must be 0"),
    ({"prompt": "x", "n": 2}, 400, "n=2"),
    ({"prompt": "x", "repetition_penalty": 1.1}, 400, "repetition_penalty"),
    ({"max_tokens": 3}, 400, "missing field 'prompt'"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": [1, 2, 9999]}, 400, "outside the vocabulary"),
    ({"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "does not exist"),
])
def test_bad_requests_are_json_errors(body: dict[str, Any], status: int, needle: str) -> None:
    with serving(fake_server()) as url:
        got, err, ctype = call(url, "POST", "/v1/completions", body)
    assert got == status and ctype == "application/json"
    assert needle in err["error"]["message"]
    if status == 400:
        assert err["error"]["type"] == "invalid_request_error"


def test_bad_json_unknown_route_and_backend_error() -> None:
    with serving(fake_server(fail_every=1)) as url:
        status, err, _ = call(url, "POST", "/v1/completions", raw=b"{not json")
        assert status == 400 and err["error"]["type"] == "invalid_request_error" and "JSON" in err["error"]["message"]
        status, err, _ = call(url, "POST", "/v1/completions", raw=b"[1, 2]")
        assert status == 400 and "JSON object" in err["error"]["message"]
        assert call(url, "GET", "/v1/nothing")[0] == 404
        status, err, _ = call(url, "POST", "/v1/completions", {"prompt": "x"})
        assert status == 500 and "injected error" in err["error"]["message"]


def test_generation_is_serialized() -> None:
    server = fake_server(delay_s=0.05)
    with serving(server) as url:
        threads = [threading.Thread(target=call, args=(url, "POST", "/v1/completions", {"prompt": PASSKEY}))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    backend = server.RequestHandlerClass.model_server.backend
    assert len(backend.seen) == 4 and backend.peak == 1


def test_serve_command_starts_and_answers(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "evalctx.cli", "serve", "--backend", "fake", "--port", "0",
                             "--quiet"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()  # "evalctx serve: model 'fake' (backend fake) on http://127.0.0.1:PORT/v1 ..."
        assert "on http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split()[0]
        assert call(url, "GET", "/health")[0] == 200
        status, ans, _ = call(url, "POST", "/v1/completions", {"model": "fake", "prompt": PASSKEY})
        assert status == 200 and ans["choices"][0]["text"] == " 68142."
    finally:
        proc.terminate()
        proc.wait(timeout=60)  # a loaded CI machine is slow to stop too
        proc.stderr.close()


def test_serve_command_refuses_the_http_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--backend", "http"]) == 2
    assert "cannot serve the http backend" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# THE key check: hf directly == hf behind `evalctx serve` through the http backend, sample by sample.

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                   # At the default 0.02 a random model answers the same bytes to every prompt,
                                   # which would hide a wrong prompt; wider weights make answers prompt-dependent.
                                   initializer_range=0.3)
    path = tmp_path_factory.mktemp("tiny_llama_serve")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _toml(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(v)  # strings, numbers and booleans are spelled the same in TOML


def short_budget_suite(path: Path, max_new_tokens: int = 8) -> Path:
    """fake_small with every task's generation budget cut, so a CPU Llama decodes it three times in seconds."""
    import tomllib

    data = tomllib.loads(Path(SUITE).read_text())
    lines = [f"{k} = {_toml(v)}" for k, v in data.items() if k != "tasks"]
    for task in data["tasks"]:
        task["max_new_tokens"] = min(task.get("max_new_tokens", max_new_tokens), max_new_tokens)
        lines += ["[[tasks]]", *(f"{k} = {_toml(v)}" for k, v in task.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_hf_direct_and_through_serve_give_the_same_greedy_answers(tiny_llama: Path, tmp_path: Path) -> None:
    suite = short_budget_suite(tmp_path / "suite.toml")
    common = ["--suite", str(suite), "--tokenizer", "byte", "--out", str(tmp_path), "--no-progress"]
    # One torch thread: on a shared 2-core box, torch's default threads spin against each other (10x slower).
    hf_opts = ["--backend-opt", "device=cpu", "--backend-opt", "chunk_size=128", "--backend-opt", "threads=1"]
    assert main(["run", *common, "--backend", "hf", "--model", str(tiny_llama), "--run-id", "direct", *hf_opts]) == 0
    parser, _ = build_parser()
    args = parser.parse_args(["serve", "--backend", "hf", "--model", str(tiny_llama), "--tokenizer", "byte",
                              *hf_opts, "--port", "0",
                              "--served-model-name", "tiny-llama", "--quiet"])
    from evalctx.commands.serve import build_server

    with serving(build_server(args)) as url:
        for run_id, send in (("text", "text"), ("ids", "ids")):
            assert main(["run", *common, "--backend", "http", "--model", "tiny-llama", "--run-id", run_id,
                         "--batch-size", "4", "--backend-opt", f"base_url={url}", "--backend-opt",
                         f"send={send}"]) == 0
    direct = pd.read_parquet(tmp_path / "direct" / "results.parquet").set_index("sample_id").sort_index()
    assert len(direct) > 0 and (direct["status"] == "ok").all()
    assert direct["completion"].nunique() > len(direct) // 2  # answers depend on the prompt: the check has teeth
    for run_id in ("text", "ids"):
        via = pd.read_parquet(tmp_path / run_id / "results.parquet").set_index("sample_id").sort_index()
        assert list(via.index) == list(direct.index)
        assert (via["status"] == "ok").all()
        assert via["completion"].tolist() == direct["completion"].tolist()
        assert via["n_output_tokens"].tolist() == direct["n_output_tokens"].tolist()
        assert via["finish_reason"].tolist() == direct["finish_reason"].tolist()
        assert (via["n_prompt_tokens"] == via["context_length"]).all()
        assert via["ttft_s"].notna().all()
