"""What a crowd of clients can hold of `evalctx serve`: a burst of 100 connections is answered (the stdlib's listen
queue of 5 reset 11 of them), half-sent requests hold at most max_connections threads and are dropped after the
read timeout, and request bodies are capped per request and in total."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any

from http_helpers import serving

from evalctx.backends.base import BackendContext, parse_options
from evalctx.backends.fake import FakeBackend
from evalctx.serve import ServeLimits, make_server
from evalctx.models.tokenizer import ByteTokenizer

BODY = json.dumps({"prompt": "The pass key is 12345. Remember it. What is the pass key? The pass key is",
                   "max_tokens": 4}).encode()
REQUEST = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
           b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY


def server(**limits: Any) -> Any:
    tok = ByteTokenizer()
    fake = FakeBackend(parse_options(FakeBackend, {}), BackendContext(tokenizer=tok))
    return make_server(fake, tok, "fake", port=0, quiet=True, limits=ServeLimits(**limits))


def exchange(addr: tuple[str, int], data: bytes, timeout: float = 30) -> bytes:
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def post_json(addr: tuple[str, int], body: bytes) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(*addr, timeout=30)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def test_a_burst_of_100_connections_is_answered() -> None:
    srv = server()
    with serving(srv):
        addr = srv.server_address[:2]
        barrier = threading.Barrier(100)
        answers: list[bytes | str] = []

        def client() -> None:
            barrier.wait()
            try:
                answers.append(exchange(addr, REQUEST))
            except OSError as exc:
                answers.append(repr(exc))

        threads = [threading.Thread(target=client) for _ in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(answers) == 100
    assert all(isinstance(a, bytes) and a.startswith(b"HTTP/1.1 200") and b" 12345." in a for a in answers), \
        [a for a in answers if not isinstance(a, bytes)][:3]


def test_half_sent_requests_hold_bounded_threads_and_time_out() -> None:
    srv = server(max_connections=8, read_timeout_s=0.5)
    with serving(srv):
        addr = srv.server_address[:2]
        before = threading.active_count()
        stalled = []
        for i in range(30):  # headers and half a body, then silence
            s = socket.create_connection(addr, timeout=30)
            s.sendall(REQUEST[:-10] if i % 2 else REQUEST[:40])
            stalled.append(s)
        time.sleep(0.5)
        assert threading.active_count() - before <= 8  # one thread per connection in service, at most 8
        t0 = time.monotonic()
        answer = exchange(addr, REQUEST)  # waits in the listen queue while stalled clients are dropped
        assert answer.startswith(b"HTTP/1.1 200")
        assert time.monotonic() - t0 < 30
        for s in stalled:  # every stalled client was dropped (EOF or reset), none is still held
            s.settimeout(10)
            try:
                assert s.recv(1024) == b""
            except TimeoutError:
                raise AssertionError("a stalled connection is still held") from None
            except ConnectionError:
                pass
            s.close()
    assert threading.active_count() <= before


def test_body_over_the_per_request_cap_is_413_and_unread() -> None:
    srv = server(max_body_bytes=1000, max_buffered_bytes=4000)
    with serving(srv):
        addr = srv.server_address[:2]
        # Announce 10 MB, send none of it: refused on the header alone, connection closed.
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        answer = exchange(addr, head)
        assert answer.startswith(b"HTTP/1.1 413") and b"over this server's 1000" in answer
        assert post_json(addr, BODY)[0] == 200


def test_bodies_held_at_once_are_capped() -> None:
    srv = server(max_body_bytes=1000, max_buffered_bytes=1500, read_timeout_s=1.0)
    with serving(srv):
        addr = srv.server_address[:2]
        # One client holds 900 bytes of the 1500-byte budget by trickling its body in, within the read timeout...
        slow = socket.create_connection(addr, timeout=30)
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n")
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.3):
                slow.sendall(b" ")

        t = threading.Thread(target=trickle)
        t.start()
        try:
            time.sleep(0.3)
            # ...so a second 900-byte body waits for room (up to the read timeout), then gets 503; a small one fits.
            padded = BODY + b" " * (900 - len(BODY))
            status, data = post_json(addr, padded)
            assert status == 503 and "too many request bodies" in data["error"]["message"]
            assert post_json(addr, BODY)[0] == 200
        finally:
            stop.set()
            t.join()
            slow.close()
        time.sleep(1.5)  # the trickling client is gone and its share freed
        assert post_json(addr, padded)[0] == 200


def test_every_bad_request_is_a_4xx_with_an_openai_error() -> None:
    """Issue 23, kind 9: out-of-vocabulary ids, max_tokens of 1e9, a lone surrogate, a 100,000-deep body, a prompt
    over the cap, PUT and oversized headers got 500s, HTML pages or no answer."""
    srv = server(max_prompt_tokens=500)
    with serving(srv):
        addr = srv.server_address[:2]
        cases = {
            "ids": json.dumps({"prompt": [5, 6, 100000], "max_tokens": 4}).encode(),
            "max_tokens": json.dumps({"prompt": "hi there", "max_tokens": 10 ** 9}).encode(),
            "surrogate": b'{"prompt": "a\\ud800b", "max_tokens": 4}',
            "deep": b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}",
            "long": json.dumps({"prompt": "x" * 2000, "max_tokens": 4}).encode(),
        }
        for name, body in cases.items():
            status, data = post_json(addr, body)
            assert 400 <= status < 500, (name, status, data)
            assert isinstance(data["error"]["message"], str) and data["error"]["message"], name
        put = exchange(addr, b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert put.startswith(b"HTTP/1.1 405") and b'"error"' in put
        big = exchange(addr, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        assert big.split(b" ")[1].startswith(b"4") and b'"error"' in big and b"<html" not in big.lower()
        assert post_json(addr, BODY)[0] == 200  # the server still answers


def test_a_request_whose_client_hung_up_while_waiting_is_not_computed() -> None:
    """Issue 23, kind 9: work for a client that left held the model, and the next client timed out."""
    tok = ByteTokenizer()
    fake = FakeBackend(parse_options(FakeBackend, {}), BackendContext(tokenizer=tok))
    calls = []
    real = fake.generate

    def counting(batch):  # type: ignore[no-untyped-def]
        calls.append(batch[0].prompt)
        time.sleep(0.5)
        return real(batch)

    fake.generate = counting  # type: ignore[method-assign]
    srv = make_server(fake, tok, "fake", port=0, quiet=True)
    with serving(srv):
        addr = srv.server_address[:2]
        first = threading.Thread(target=post_json, args=(addr, BODY))
        first.start()
        time.sleep(0.1)
        body = json.dumps({"prompt": "GONE " * 10, "max_tokens": 4}).encode()
        s = socket.create_connection(addr)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.1)
        s.close()  # gives up while the first request holds the model
        first.join()
        assert post_json(addr, BODY)[0] == 200
    assert not any("GONE" in p for p in calls) and len(calls) == 2
