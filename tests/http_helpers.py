"""Loopback HTTP test helpers: a server in a thread and a scripted stub OpenAI server. Everything binds 127.0.0.1
on an ephemeral port and is shut down when its context exits."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[str]:
    """Serve in a daemon thread; yields the /v1 base URL; shuts down (and joins) on exit."""
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def free_port() -> int:
    """A port nothing listens on (connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass


def start_sse(handler: BaseHTTPRequestHandler, status: int = 200) -> None:
    """Headers of a server-sent event stream that ends when the connection closes."""
    handler.send_response(status)
    handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.close_connection = True


def send_json(handler: BaseHTTPRequestHandler, status: int, answer: Any) -> None:
    data = json.dumps(answer).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@dataclass
class Reply:
    """One scripted answer: a status with a JSON body (or a function of the request body giving it), or an SSE
    stream of (delay_s, data) events."""

    status: int = 200
    body: Any = None
    sse: list[tuple[float, str]] | None = None
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    """Sent as the body verbatim (malformed JSON), instead of ``body``; after an ``sse`` stream's events, the bytes
    written before the connection closes."""
    trickle_s: float = 0.0
    """Seconds between the bytes of the body: a server that trickles."""


def completion(text: str = " 42.", prompt_tokens: int | None = 10, completion_tokens: int = 2,
               chat: bool = False, finish_reason: str = "stop") -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    d: dict[str, Any] = {"id": "x", "object": "text_completion", "choices": [choice]}
    if prompt_tokens is not None:
        d["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}
    return d


class StubServer:
    """An OpenAI-ish server whose POST answers follow a script (the last reply repeats when it runs out), and
    which records every request body and the peak number of requests in flight."""

    def __init__(self, replies: list[Reply] | None = None, models: list[str] = ("stub-model",),
                 owned_by: str = "stub") -> None:
        self.replies = list(replies or [Reply(body=completion())])
        self.models = list(models)
        self.owned_by = owned_by
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self._n = 0
        stub = self

        class Handler(_Handler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/v1/models":
                    send_json(self, 404, {"detail": "Not Found"})
                    return
                send_json(self, 200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": stub.owned_by}
                                                                 for m in stub.models]})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._lock:
                    stub.bodies.append(body)
                    stub.headers.append(dict(self.headers))
                    reply = stub.replies[min(stub._n, len(stub.replies) - 1)]
                    stub._n += 1
                    stub.in_flight += 1
                    stub.peak_in_flight = max(stub.peak_in_flight, stub.in_flight)
                counted = True
                try:
                    time.sleep(reply.delay_s)
                    if reply.sse is not None:
                        start_sse(self, reply.status)
                        for delay, data in reply.sse:
                            time.sleep(delay)
                            self.wfile.write(f"data: {data}\n\n".encode())
                            self.wfile.flush()
                        if reply.raw is not None:
                            self.wfile.write(reply.raw)  # then the connection closes: a cut stream
                        return
                    answer = reply.body(body) if callable(reply.body) else reply.body  # may echo the request
                    data = reply.raw if reply.raw is not None else json.dumps(answer).encode()
                    # No longer in flight once the answer goes out: the client may send its next request as soon
                    # as it has read this one, before this thread would get to a later decrement.
                    with stub._lock:
                        stub.in_flight -= 1
                        counted = False
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    if not reply.trickle_s:
                        self.wfile.write(data)
                    for i in range(len(data) if reply.trickle_s else 0):
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                        time.sleep(reply.trickle_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (timeout tests)
                finally:
                    if counted:
                        with stub._lock:
                            stub.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @contextlib.contextmanager
    def run(self) -> Iterator[str]:
        with serving(self.server) as url:
            yield url


class LlamaCppStub:
    """A stand-in for llama-cpp-python 0.3.36's server (``python -m llama_cpp.server``) that does what the real
    one was seen to do (docs/http.md; tests/test_llamacpp_server.py runs the real one):

    * ``/v1/models`` says ``owned_by: me``; ``/openapi.json`` is titled "🦙 llama.cpp Python API";
    * the completions prompt must be text: token ids get HTTP 500 with pydantic's "N validation errors";
    * text is tokenized with a BOS added always, special-token text parsed (``add_special_tokens`` is ignored);
    * chat messages are rendered with the generation prompt always (``continue_final_message`` is ignored);
    * decoding is greedy only with ``repeat_penalty: 1.0`` (its default 1.1 changes answers: here, a wrong one);
    * streams carry one chunk per token, a last chunk with the finish reason, ``[DONE]``, and no usage;
    * one request at a time; a running stream is cut (``[DONE]``, no finish reason) when another request waits;
    * a prompt of ``n_ctx`` tokens or more: HTTP 400 ``context_length_exceeded``, or an empty 200 stream;
      prompt + max_tokens over ``n_ctx``: max_tokens is shortened to fit, finish reason "length".

    ``answer`` maps the prompt text the server saw to the greedy answer (default: evalctx's oracle)."""

    def __init__(self, tokenizer: Any, n_ctx: int = 8192, token_s: float = 0.002,
                 answer: Any = None) -> None:
        from evalctx.backends.fake import oracle_answer

        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.token_s = token_s
        self.card: dict[str, Any] = {}
        """More fields of the /v1/models entry (vLLM's ``root``: the checkpoint path); may change while serving."""
        self.props: dict[str, Any] | None = None
        """The answer of ``/props`` (llama.cpp's C++ server has one; llama-cpp-python's has none: 404)."""
        self.context_shift = False
        """llama.cpp's context shift (its default until mid-2025): prompt + max_tokens over ``n_ctx`` drops half of
        the context and answers from the rest (here: a wrong answer), counting the whole prompt in usage."""
        self.report_truncation = False
        """With ``context_shift``: mark such an answer ``truncated: true``, as llama.cpp's own endpoints do."""
        self.answer = answer or oracle_answer
        self.bodies: list[dict[str, Any]] = []
        self.n_cut = 0
        self._serial = threading.Lock()
        self._count = threading.Lock()
        self._waiting = 0
        stub = self

        class Handler(_Handler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/v1/models":
                    send_json(self, 200, {"object": "list", "data": [
                        {"id": "tiny.gguf", "object": "model", "owned_by": "me", "permissions": [], **stub.card}]})
                elif self.path == "/props" and stub.props is not None:
                    send_json(self, 200, stub.props)
                elif self.path == "/openapi.json":
                    send_json(self, 200, {"openapi": "3.1.0",
                                          "info": {"title": "🦙 llama.cpp Python API", "version": "0.3.36"}})
                else:
                    send_json(self, 404, {"detail": "Not Found"})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._count:
                    stub.bodies.append(body)
                    stub._waiting += 1
                try:
                    with stub._serial:
                        with stub._count:
                            stub._waiting -= 1
                        stub._answer(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def _answer(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        tok = self.tokenizer
        if h.path == "/v1/completions":
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                n = len(prompt) + 1 if isinstance(prompt, list) else 1
                send_json(h, 500, {"error": {"message": f"{n} validation errors:\n  {{'type': 'string_type', 'loc': "
                                   "('body', 'prompt', 'str'), 'msg': 'Input should be a valid string'}",
                                   "type": "internal_server_error", "param": None, "code": None}})
                return
            seen, ids = prompt, tok.encode(prompt, add_special_tokens=True)
        else:
            seen = tok.apply_chat_template(body["messages"])
            ids = tok.encode(seen, add_special_tokens=False)
        stream = body.get("stream") is True
        max_tokens = body.get("max_tokens") or 16
        if len(ids) >= self.n_ctx:
            if stream:
                start_sse(h)  # and nothing else: the real server's answer to a prompt over its context
                return
            send_json(h, 400, {"error": {
                "message": f"This model's maximum context length is {self.n_ctx} tokens, however you requested "
                           f"{len(ids) + max_tokens} tokens ({len(ids)} in your prompt; {max_tokens} for the "
                           "completion). Please reduce your prompt; or completion length.",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})
            return
        answer = self.answer(seen)
        if body.get("repeat_penalty") != 1.0:
            answer = answer[::-1]  # the default penalty changes the greedy answer
        shifted = self.context_shift and len(ids) + max_tokens > self.n_ctx
        if shifted:
            answer = " 0."  # half the context, the needle with it, is gone
        _, offsets = tok.encode_with_offsets(answer)
        pieces = [answer[a:b] for a, b in offsets]
        budget = max_tokens if shifted else min(max_tokens, self.n_ctx - len(ids))
        finish = "length" if len(pieces) > budget else "stop"
        pieces = pieces[:budget]
        chat = h.path != "/v1/completions"
        if not stream:
            time.sleep(self.token_s * len(pieces))
            text = "".join(pieces)
            choice = {"index": 0, "logprobs": None, "finish_reason": finish,
                      **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
            send_json(h, 200, {"id": "cmpl-1", "object": "text_completion", "model": "tiny.gguf", "choices": [choice],
                               "usage": {"prompt_tokens": len(ids), "completion_tokens": len(pieces),
                                         "total_tokens": len(ids) + len(pieces)},
                               **({"truncated": True} if shifted and self.report_truncation else {})})
            return
        start_sse(h)

        def event(text: str, reason: str | None) -> None:
            part = {"delta": {"content": text} if text else {}} if chat else {"text": text}
            chunk = {"id": "cmpl-1", "object": "text_completion", "model": "tiny.gguf",
                     "choices": [{**part, "index": 0, "logprobs": None, "finish_reason": reason}]}
            h.wfile.write(f"data: {json.dumps(chunk)}\r\n\r\n".encode())
            h.wfile.flush()

        for piece in pieces:
            time.sleep(self.token_s)
            if self._waiting:  # interrupt_requests: another request waits for the model
                self.n_cut += 1
                h.wfile.write(b"data: [DONE]\r\n\r\n")
                return
            event(piece, None)
        event("", finish)
        h.wfile.write(b"data: [DONE]\r\n\r\n")

    @contextlib.contextmanager
    def run(self) -> Iterator[str]:
        with serving(self.server) as url:
            yield url
