"""One HTTP attempt against an OpenAI-compatible server, read strictly: a deadline per attempt, every field of the
answer checked for its type, the failure sorted into "try again" or "this request is wrong".

Stdlib only (http.client). The deadline is a watchdog that shuts the socket down when the attempt's time is up:
a socket timeout alone restarts at every byte, so a server that trickles a byte every half second would keep
an attempt alive for ever.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterator

from evalctx.redact import mask_text

# 408 and 429 are 4xx but say "try again later", not "this request is wrong": retrying them is what every OpenAI
# client does, and a rate-limited gateway would otherwise turn a whole run into error rows.
_RETRY_STATUS = {408, 429}
# A 5xx whose body is a request validation error (llama-cpp-python answers a list-of-ids prompt with HTTP 500 and
# pydantic's "N validation errors"): the request is wrong, another attempt repeats it.
_VALIDATION = re.compile(r"\bvalidation errors?\b", re.I)


class Retryable(Exception):
    """A failure worth another attempt (the message is the one-line error if attempts run out)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Fatal(Exception):
    """A failure that another attempt would repeat (a 4xx, a malformed answer, an answer cut by the context)."""


def one_line(text: str, limit: int = 400) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def server_message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body text."""
    text = body.decode("utf-8", errors="replace")
    try:
        d = json.loads(text)
    except ValueError:
        return one_line(text) or "(empty body)"
    if isinstance(d, dict):
        err = d.get("error", d)
        if isinstance(err, dict) and err.get("message"):
            return one_line(str(err["message"]))
        if isinstance(err, str):
            return one_line(err)
        if d.get("detail"):  # FastAPI validation errors (vLLM, SGLang)
            return one_line(json.dumps(d["detail"]))
        if d.get("message"):
            return one_line(str(d["message"]))
    return one_line(text)


@dataclass
class Answer:
    """One whole HTTP answer, its fields type-checked; nothing here is judged yet (see the backend)."""

    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    """Prompt tokens the server took from its prefix cache, where it says (:func:`_cached`); None where not."""
    latency_s: float
    ttft_s: float | None
    """Time to the first streamed chunk carrying generated text; None without streaming."""
    streamed: bool
    n_events: int = 0
    """Data events in a stream: 0 is an empty stream (llama.cpp's answer to a prompt over its context)."""
    truncated: bool = False
    """The server says it cut or shifted the context (llama.cpp's ``truncated: true``)."""


MAX_ANSWER_BYTES = 64 << 20
"""An answer larger than this is not one to a request of a few thousand tokens: an endless body is cut here (it
grew to 4.8 GB in 8 s before the cap)."""
MAX_LINE_BYTES = 16 << 20


def _read_capped(resp: http.client.HTTPResponse) -> bytes:
    data = resp.read(MAX_ANSWER_BYTES + 1)
    if len(data) > MAX_ANSWER_BYTES:
        raise Retryable(f"the answer grew past {MAX_ANSWER_BYTES >> 20} MiB: not an answer to a bounded request")
    return data


def _truncated(*parts: Any) -> bool:
    """llama.cpp's server marks an answer whose context it cut or shifted with ``truncated: true`` (at the top level
    or in the choice)."""
    return any(isinstance(p, dict) and p.get("truncated") is True for p in parts)


def _count(usage: dict[str, Any], key: str, where: str = "usage") -> int | None:
    v = usage.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise Fatal(f"malformed answer: {where}.{key} is {v!r}, not a token count")
    return v


def _usage(usage: Any) -> tuple[int | None, int | None, int | None]:
    """(prompt_tokens, completion_tokens, cached_tokens) of a usage object; None where absent."""
    if usage is None:
        return None, None, None
    if not isinstance(usage, dict):
        raise Fatal(f"malformed answer: usage is {one_line(json.dumps(usage), 120)}, not an object")
    details = usage.get("prompt_tokens_details")
    cached = _count(details, "cached_tokens", "usage.prompt_tokens_details") if isinstance(details, dict) else None
    return _count(usage, "prompt_tokens"), _count(usage, "completion_tokens"), cached


def _cache_n(d: Any) -> int | None:
    """llama.cpp's ``llama-server``: ``timings.cache_n``, the prompt tokens it kept from its slot's KV cache
    (``timings.prompt_n`` are the ones it computed); sent in every answer and in a stream's last chunk."""
    timings = d.get("timings") if isinstance(d, dict) else None
    return _count(timings, "cache_n", "timings") if isinstance(timings, dict) else None


def _cached(usage_cached: int | None, cache_n: int | None, prompt_tokens: int | None) -> int | None:
    """The prompt tokens served from the server's prefix cache: ``usage.prompt_tokens_details.cached_tokens``
    (vLLM with --enable-prompt-tokens-details, SGLang with --enable-cache-report, trtllm-serve, newer llama.cpp,
    the OpenAI API), else llama.cpp's ``timings.cache_n``. None when the server says neither: a server that only
    reports a hit (SGLang without --enable-cache-report leaves out a count of 0) says nothing about the others."""
    cached = usage_cached if usage_cached is not None else cache_n
    if cached is not None and prompt_tokens is not None and cached > prompt_tokens:
        raise Fatal(f"malformed answer: {cached} cached prompt tokens of a {prompt_tokens}-token prompt")
    return cached


def _choice(d: Any, what: str) -> dict[str, Any] | None:
    """Choice 0 of an answer or chunk; None for a chunk without choices (a usage-only chunk)."""
    if not isinstance(d, dict):
        raise Fatal(f"malformed {what}: {one_line(json.dumps(d), 160)} is not an object")
    choices = d.get("choices")
    if choices is None or choices == []:
        return None
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise Fatal(f"malformed {what}: choices is {one_line(json.dumps(choices), 160)}, not a list of objects")
    for c in choices:
        if c.get("index", 0) == 0:
            return c
    return None


def _text(choice: dict[str, Any], what: str) -> str | None:
    """The text of a choice (completions ``text``, chat ``message.content`` / ``delta.content``); a value that is
    not a string is a malformed answer, never passed on."""
    if "text" in choice:
        text = choice["text"]
    else:
        msg = choice.get("message", choice.get("delta"))
        if msg is not None and not isinstance(msg, dict):
            raise Fatal(f"malformed {what}: message is {one_line(json.dumps(msg), 120)}, not an object")
        text = (msg or {}).get("content")
    if text is not None and not isinstance(text, str):
        raise Fatal(f"malformed {what}: the text is {one_line(json.dumps(text), 120)}, not a string")
    return text


def _finish(choice: dict[str, Any], what: str) -> str | None:
    f = choice.get("finish_reason")
    if f is not None and not isinstance(f, str):
        raise Fatal(f"malformed {what}: finish_reason is {f!r}, not a string")
    return f or None


class Client:
    """Connections to one server root (``http(s)://host:port/prefix``)."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        self.base_url = mask_text(base_url)  # for messages, which land in rows: a URL password never does
        self._scheme = parsed.scheme
        # http.client takes host[:port] only: credentials in the URL (a gateway's user:pass@) go as Basic auth.
        self._netloc = parsed.netloc.rpartition("@")[2]
        self._basic: str | None = None
        if parsed.username is not None:
            user = urllib.parse.unquote(parsed.username)
            password = urllib.parse.unquote(parsed.password or "")
            self._basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        self.prefix = parsed.path.rstrip("/")
        self.api_key = api_key

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._netloc, timeout=timeout)

    def _headers(self, body: bool) -> dict[str, str]:
        h = {"Accept": "application/json, text/event-stream", "User-Agent": "evalctx"}
        if body:
            h["Content-Type"] = "application/json"
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        elif self._basic:
            h["Authorization"] = f"Basic {self._basic}"
        return h

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        """GET a JSON document (``path`` from the host root). Raises OSError, HTTPException, ValueError or Fatal."""
        conn = self._connection(timeout)
        try:
            conn.request("GET", path, headers=self._headers(False))
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise Fatal(f"HTTP {resp.status}: {server_message(body)}")
            return json.loads(body)
        finally:
            conn.close()

    def post(self, path: str, payload: bytes, timeout_s: float) -> Answer:
        """POST one request and read the whole answer (SSE or JSON) within ``timeout_s`` from sending it.

        Raises Retryable (connection errors, the deadline, 5xx, 408, 429, a stream cut before its end) or Fatal
        (any other 4xx, a 5xx validation error, a malformed answer, an error event in the stream)."""
        t0 = time.perf_counter()
        conn = self._connection(timeout_s)
        expired = threading.Event()
        socks: list[socket.socket] = []  # held here: a "Connection: close" answer detaches it from conn

        def expire() -> None:
            expired.set()
            for sock in socks:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read; the attempt is over
                except OSError:
                    pass

        watchdog = threading.Timer(timeout_s, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            socks.append(conn.sock)
            if expired.is_set():
                raise socket.timeout()
            conn.request("POST", path, body=payload, headers=self._headers(True))
            resp = conn.getresponse()
            if 300 <= resp.status < 400:
                where = resp.getheader("Location") or "(no Location header)"
                tail = path[len(self.prefix):]
                base = where[:-len(tail)] if tail and where.endswith(tail) else where
                raise Fatal(f"HTTP {resp.status} from {self.base_url}{tail}: the server redirects to {where}; "
                            f"pass base_url={base}")
            if resp.status >= 400:
                self._raise_status(resp, path)
            ctype = (resp.getheader("Content-Type") or "").lower()
            if "text/event-stream" in ctype:
                answer = self._read_stream(resp, t0)
            else:
                answer = self._read_json(_read_capped(resp), t0)
            if expired.is_set():
                raise socket.timeout()
            return answer
        except (Retryable, Fatal, ConnectionError, http.client.HTTPException, OSError) as exc:
            if expired.is_set() or isinstance(exc, TimeoutError):
                # Whatever the cut socket made the reader say, the cause is the deadline.
                raise Retryable(f"timed out after {timeout_s:g} s (timeout_s) at {self.base_url}") from None
            if isinstance(exc, (Retryable, Fatal)):
                raise
            raise Retryable(f"connection to {self.base_url} failed: {type(exc).__name__}: "
                            f"{one_line(str(exc), 200)}") from None
        finally:
            watchdog.cancel()
            conn.close()

    def _raise_status(self, resp: http.client.HTTPResponse, path: str) -> None:
        msg = f"HTTP {resp.status} from {self.base_url}{path[len(self.prefix):]}: {server_message(resp.read())}"
        if resp.status in _RETRY_STATUS or (resp.status >= 500 and not _VALIDATION.search(msg)):
            retry_after = resp.getheader("Retry-After")
            try:
                ra = float(retry_after) if retry_after else None
            except ValueError:
                ra = None
            raise Retryable(msg, ra)
        raise Fatal(msg + (" (a validation error: not retried)" if resp.status >= 500 else ""))

    def _read_json(self, data: bytes, t0: float) -> Answer:
        latency = time.perf_counter() - t0
        try:
            d = json.loads(data)
        except ValueError:
            shown = one_line(data.decode("utf-8", "replace"), 200) or "(an empty body)"
            raise Fatal(f"server answered non-JSON: {shown}") from None
        if isinstance(d, dict) and d.get("error"):
            raise Fatal(f"server error: {server_message(json.dumps(d).encode())}")
        choice = _choice(d, "answer")
        if choice is None:
            raise Fatal(f"malformed answer: no choices: {one_line(json.dumps(d), 200)}")
        text = _text(choice, "answer")
        if text is None:
            raise Fatal(f"malformed answer: choice 0 has no text: {one_line(json.dumps(choice), 200)}")
        p, c, cached = _usage(d.get("usage"))
        return Answer(text=text, finish_reason=_finish(choice, "answer"), prompt_tokens=p, completion_tokens=c,
                      cached_tokens=_cached(cached, _cache_n(d), p), latency_s=latency, ttft_s=None,
                      streamed=False, truncated=_truncated(d, choice))

    def _sse_events(self, resp: http.client.HTTPResponse) -> Iterator[bytes]:
        """The data of each server-sent event, as the SSE spec reads them: ``data:`` lines (one leading space
        stripped) joined with newlines until a blank line; comments and other fields skipped. A stream over
        :data:`MAX_ANSWER_BYTES` or cut in the middle of a line is a broken answer (Retryable)."""
        data: list[bytes] = []
        total = events = 0
        while True:
            line = resp.readline(MAX_LINE_BYTES + 1)
            total += len(line)
            if total > MAX_ANSWER_BYTES or len(line) > MAX_LINE_BYTES:
                raise Retryable(f"the stream from {self.base_url} grew past {MAX_ANSWER_BYTES >> 20} MiB (or a line "
                                f"past {MAX_LINE_BYTES >> 20} MiB): not an answer to a bounded request")
            if not line:
                if data:
                    yield b"\n".join(data)
                return
            if not line.endswith(b"\n"):
                # The connection closed in the middle of an event (a close-delimited stream cut by a crash or a
                # proxy): the answer broke off, the server did not send a malformed chunk.
                raise Retryable(f"the stream from {self.base_url} broke off in the middle of an event after "
                                f"{events} events")
            line = line.rstrip(b"\r\n")
            if not line:
                if data:
                    events += 1
                    yield b"\n".join(data)
                    data = []
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)

    def _read_stream(self, resp: http.client.HTTPResponse, t0: float) -> Answer:
        parts: list[str] = []
        ttft: float | None = None
        finish: str | None = None
        usage: tuple[int | None, int | None, int | None] = (None, None, None)
        cache_n: int | None = None
        n_events = 0
        done = False
        truncated = False
        for data in self._sse_events(resp):
            n_events += 1
            data = data.strip()
            if data == b"[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                raise Fatal(f"bad SSE chunk from server: {one_line(data.decode('utf-8', 'replace'), 200)}") \
                    from None
            if isinstance(chunk, dict) and chunk.get("error"):
                raise Fatal(f"server error in stream: {server_message(json.dumps(chunk).encode())}")
            if isinstance(chunk, dict) and chunk.get("usage") is not None:
                usage = _usage(chunk["usage"])
            cache_n = _cache_n(chunk) if isinstance(chunk, dict) and "timings" in chunk else cache_n
            choice = _choice(chunk, "stream chunk")
            truncated = truncated or _truncated(chunk, choice)
            if choice is None:
                continue
            text = _text(choice, "stream chunk")
            if text:
                parts.append(text)
            reason = _finish(choice, "stream chunk")
            if ttft is None and (text or reason):
                # A chat stream opens with an empty role-only delta before any token exists: not a token.
                ttft = time.perf_counter() - t0
            if reason:
                finish = reason
        if not done and finish is None and n_events:
            raise Retryable(f"the stream from {self.base_url} broke off before [DONE] after {n_events} events")
        return Answer(text="".join(parts), finish_reason=finish, prompt_tokens=usage[0],
                      completion_tokens=usage[1], cached_tokens=_cached(usage[2], cache_n, usage[0]),
                      latency_s=time.perf_counter() - t0,
                      ttft_s=ttft, streamed=True, n_events=n_events, truncated=truncated)
