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


@dataclass
class Reply:
    """One scripted answer: a status with a JSON body (or a function of the request body giving it), or an SSE
    stream of (delay_s, data) events."""

    status: int = 200
    body: Any = None
    sse: list[tuple[float, str]] | None = None
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def completion(text: str = " 42.", prompt_tokens: int | None = 10, completion_tokens: int = 2,
               chat: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
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

    def __init__(self, replies: list[Reply] | None = None, models: list[str] = ("stub-model",)) -> None:
        self.replies = list(replies or [Reply(body=completion())])
        self.models = list(models)
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self._n = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                data = json.dumps({"object": "list", "data": [{"id": m, "object": "model"}
                                                              for m in stub.models]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._lock:
                    stub.bodies.append(body)
                    stub.headers.append(dict(self.headers))
                    reply = stub.replies[min(stub._n, len(stub.replies) - 1)]
                    stub._n += 1
                    stub.in_flight += 1
                    stub.peak_in_flight = max(stub.peak_in_flight, stub.in_flight)
                try:
                    time.sleep(reply.delay_s)
                    if reply.sse is not None:
                        self.send_response(reply.status)
                        self.send_header("Content-Type", "text/event-stream")
                        self.send_header("Connection", "close")
                        self.end_headers()
                        self.close_connection = True
                        for delay, data in reply.sse:
                            time.sleep(delay)
                            self.wfile.write(f"data: {data}\n\n".encode())
                            self.wfile.flush()
                        return
                    answer = reply.body(body) if callable(reply.body) else reply.body  # may echo the request
                    data = json.dumps(answer).encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (timeout tests)
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @contextlib.contextmanager
    def run(self) -> Iterator[str]:
        with serving(self.server) as url:
            yield url
