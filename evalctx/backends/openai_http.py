"""OpenAI-compatible HTTP backend: trtllm-serve, vLLM, SGLang, ``evalctx serve`` or any /v1/completions server.

Stdlib only (http.client + threads). Each request of a batch is one HTTP request; at most ``concurrency`` are in
flight. TTFT is the time to the first streamed chunk that carries generated text, as the client sees it, so it
includes the network and any queueing on the server. Transient failures (connection errors, timeouts, 5xx, 408,
429) are retried with exponential backoff; any other 4xx is the server refusing this request, so it becomes an
error row at once with the server's message.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from evalctx.backends.base import Backend, BackendContext
from evalctx.errors import LengthError, UsageError
from evalctx.records import GenerationRequest, GenerationResult

# 408 and 429 are 4xx but say "try again later", not "this request is wrong": retrying them is what every OpenAI
# client does, and a rate-limited gateway would otherwise turn a whole run into error rows.
_RETRY_STATUS = {408, 429}
_MAX_RETRY_AFTER_S = 60.0


class _Retryable(Exception):
    """A failure worth another attempt (the message is the one-line error if attempts run out)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failure that another attempt would repeat (a 4xx, a malformed answer)."""


def _one_line(text: str, limit: int = 400) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _server_message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body text."""
    text = body.decode("utf-8", errors="replace")
    try:
        d = json.loads(text)
    except ValueError:
        return _one_line(text) or "(empty body)"
    if isinstance(d, dict):
        err = d.get("error", d)
        if isinstance(err, dict) and err.get("message"):
            return _one_line(str(err["message"]))
        if isinstance(err, str):
            return _one_line(err)
        if d.get("detail"):  # FastAPI validation errors (vLLM, SGLang)
            return _one_line(json.dumps(d["detail"]))
        if d.get("message"):
            return _one_line(str(d["message"]))
    return _one_line(text)


class HTTPBackend(Backend):
    name: ClassVar[str] = "http"

    @dataclass
    class Options:
        base_url: str = "http://127.0.0.1:8000/v1"
        """Server root including the API prefix; a bare ``http://host:port`` gets ``/v1`` appended."""
        model: str | None = None
        """Model name the server serves (default: --model, else the only model /v1/models lists)."""
        endpoint: str = "completions"
        """completions (token-exact: the rendered prompt goes as is) | chat (the server applies its template)."""
        send: str = "text"
        """text (the prompt text; the server tokenizes) | ids (the token ids; vLLM, SGLang, trtllm-serve)."""
        stream: bool = True
        """Stream the answer (SSE): TTFT = time to the first streamed token. Without it ttft_s is None."""
        concurrency: int = 4
        """Requests in flight at once, within one batch of the runner (see --batch-size)."""
        timeout_s: float = 600.0
        """Per attempt, from sending the request to the end of the answer."""
        retries: int = 3
        """Extra attempts after a connection error, timeout, 5xx, 408 or 429 (never after another 4xx)."""
        backoff_s: float = 1.0
        """First wait before a retry; doubled each time (a server's Retry-After wins, up to 60 s)."""
        api_key: str | None = None
        """Bearer token (default: $OPENAI_API_KEY). Prefer the variable: flags end up in the run's command line."""
        extra_body: dict[str, Any] | str | None = None
        """Fields merged into every request body as given: a suite table or a JSON object string."""
        temperature: float = 0.0
        add_special_tokens: bool | None = None
        """Sent as the vLLM/SGLang ``add_special_tokens`` field when set; None sends nothing (server default)."""
        continue_final_message: bool = True
        """Chat: a final assistant message is a prefill (``continue_final_message``, vLLM/SGLang extension)."""

    def __init__(self, options: Any, ctx: BackendContext) -> None:
        super().__init__(options, ctx)
        o = options
        if o.endpoint not in ("completions", "chat"):
            raise UsageError(f"backend http: endpoint must be completions or chat, not {o.endpoint!r}")
        if o.send not in ("text", "ids"):
            raise UsageError(f"backend http: send must be text or ids, not {o.send!r}")
        if o.endpoint == "chat" and o.send == "ids":
            raise UsageError("backend http: the chat endpoint takes messages, not token ids: "
                             "use endpoint=completions with send=ids")
        if o.concurrency < 1:
            raise UsageError("backend http: concurrency must be >= 1")
        if o.retries < 0 or o.timeout_s <= 0 or o.backoff_s < 0:
            raise UsageError("backend http: retries and backoff_s must be >= 0 and timeout_s > 0")
        self.extra_body = self._parse_extra_body(o.extra_body)
        self.base_url = self._normalize_url(o.base_url)
        parsed = urllib.parse.urlsplit(self.base_url)
        self._scheme = parsed.scheme
        self._netloc = parsed.netloc
        self._prefix = parsed.path.rstrip("/")
        self.api_key = o.api_key or os.environ.get("OPENAI_API_KEY") or None
        self._models_answer: Any = None
        self._warned_no_usage = False
        self.model_name = o.model or ctx.model or self._only_served_model()

    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _parse_extra_body(value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if isinstance(value, dict):
            return dict(value)
        try:
            d = json.loads(value)
        except ValueError as exc:
            raise UsageError(f"backend http: extra_body must be a JSON object, e.g. "
                             f"extra_body='{{\"repetition_penalty\": 1.0}}' ({exc})") from None
        if not isinstance(d, dict):
            raise UsageError("backend http: extra_body must be a JSON object (a table in the suite file)")
        return d

    @staticmethod
    def _normalize_url(url: str) -> str:
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UsageError(f"backend http: base_url must look like http://HOST:PORT/v1, not {url!r}")
        path = parsed.path.rstrip("/")
        if not path:
            path = "/v1"  # every OpenAI-compatible server mounts its API there
        return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._netloc, timeout=timeout)

    def _headers(self, body: bool) -> dict[str, str]:
        h = {"Accept": "application/json, text/event-stream", "User-Agent": "evalctx"}
        if body:
            h["Content-Type"] = "application/json"
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _get_models(self, timeout: float = 10.0) -> Any:
        conn = self._connection(timeout)
        try:
            conn.request("GET", self._prefix + "/models", headers=self._headers(False))
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise _Fatal(f"HTTP {resp.status}: {_server_message(body)}")
            return json.loads(body)
        finally:
            conn.close()

    def _only_served_model(self) -> str:
        try:
            self._models_answer = self._get_models()
            ids = [m.get("id") for m in self._models_answer.get("data", []) if isinstance(m, dict)]
        except (OSError, http.client.HTTPException, ValueError, AttributeError, _Fatal) as exc:
            raise UsageError(f"backend http: no model name given and {self.base_url}/models did not answer "
                             f"({_one_line(str(exc), 160)}): pass --model NAME or --backend-opt model=NAME") from None
        if len(ids) != 1 or not ids[0]:
            raise UsageError(f"backend http: the server lists {len(ids)} models ({', '.join(map(str, ids))}): "
                             "pass --backend-opt model=NAME")
        return str(ids[0])

    # ------------------------------------------------------------------------------------------------------
    def _body(self, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        o = self.options
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": req.max_new_tokens,
                                "temperature": o.temperature}
        if o.endpoint == "completions":
            path = "/completions"
            body["prompt"] = list(req.prompt_ids) if o.send == "ids" else req.prompt
        else:
            path = "/chat/completions"
            messages = req.extra.get("messages") if req.extra else None
            if messages:
                messages = list(messages)
                if messages[-1].get("role") == "assistant" and o.continue_final_message:
                    body["continue_final_message"] = True
                    body["add_generation_prompt"] = False
            else:
                messages = [{"role": "user", "content": req.prompt}]
            body["messages"] = messages
        if o.add_special_tokens is not None and o.send == "text":
            body["add_special_tokens"] = o.add_special_tokens
        if o.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body.update(self.extra_body)  # last: a user's explicit field wins over ours
        return self._prefix + path, body

    def _attempt(self, path: str, payload: bytes) -> GenerationResult:
        o = self.options
        t0 = time.perf_counter()
        deadline = t0 + o.timeout_s
        conn = self._connection(o.timeout_s)
        try:
            conn.request("POST", path, body=payload, headers=self._headers(True))
            resp = conn.getresponse()
            if resp.status >= 400:
                msg = f"HTTP {resp.status} from {self.base_url}{path[len(self._prefix):]}: " \
                      f"{_server_message(resp.read())}"
                if resp.status >= 500 or resp.status in _RETRY_STATUS:
                    retry_after = resp.getheader("Retry-After")
                    try:
                        ra = float(retry_after) if retry_after else None
                    except ValueError:
                        ra = None
                    raise _Retryable(msg, ra)
                raise _Fatal(msg)
            ctype = (resp.getheader("Content-Type") or "").lower()
            if "text/event-stream" in ctype:
                return self._read_stream(conn, resp, t0, deadline)
            # Not a stream (stream=false, or a server that ignored it): no TTFT can be measured.
            data = resp.read()
            latency = time.perf_counter() - t0
            try:
                d = json.loads(data)
            except ValueError:
                raise _Fatal(f"server answered non-JSON: {_one_line(data.decode('utf-8', 'replace'), 200)}") \
                    from None
            return self._result(d, latency, None)
        except socket.timeout:
            raise _Retryable(f"timed out after {o.timeout_s:g} s (timeout_s) at {self.base_url}") from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            raise _Retryable(f"connection to {self.base_url} failed: {type(exc).__name__}: "
                             f"{_one_line(str(exc), 200)}") from None
        finally:
            conn.close()

    def _read_stream(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, t0: float,
                     deadline: float) -> GenerationResult:
        parts: list[str] = []
        ttft: float | None = None
        finish: str | None = None
        usage: dict[str, Any] | None = None
        done = False
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise socket.timeout()
            if conn.sock is not None:
                conn.sock.settimeout(remaining)
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, ": keep-alive" comments, "event:" lines
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                raise _Fatal(f"bad SSE chunk from server: {_one_line(data.decode('utf-8', 'replace'), 200)}") \
                    from None
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error"):
                raise _Fatal(f"server error in stream: {_server_message(json.dumps(chunk).encode())}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("index", 0) != 0:
                    continue
                text = choice.get("text")
                if text is None:
                    text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
                if ttft is None and (text or choice.get("finish_reason")):
                    # A chat stream opens with an empty role-only delta before any token exists: not a token.
                    ttft = time.perf_counter() - t0
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        latency = time.perf_counter() - t0
        if not done and finish is None:
            raise _Retryable(f"stream from {self.base_url} ended before [DONE]")
        return GenerationResult(
            text="".join(parts), n_prompt_tokens=_int(usage, "prompt_tokens"),
            n_output_tokens=_int(usage, "completion_tokens"), latency_s=latency, ttft_s=ttft,
            finish_reason=finish)

    def _result(self, d: Any, latency: float, ttft: float | None) -> GenerationResult:
        if not isinstance(d, dict) or not d.get("choices"):
            if isinstance(d, dict) and d.get("error"):
                raise _Fatal(f"server error: {_server_message(json.dumps(d).encode())}")
            raise _Fatal(f"server answer has no choices: {_one_line(json.dumps(d), 200)}")
        choice = d["choices"][0]
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content")
        usage = d.get("usage")
        return GenerationResult(
            text=text or "", n_prompt_tokens=_int(usage, "prompt_tokens"),
            n_output_tokens=_int(usage, "completion_tokens"), latency_s=latency, ttft_s=ttft,
            finish_reason=choice.get("finish_reason"))

    def _one(self, req: GenerationRequest) -> GenerationResult:
        o = self.options
        try:
            path, body = self._body(req)
            payload = json.dumps(body).encode("utf-8")
        except (TypeError, ValueError) as exc:
            return GenerationResult(text=None, error=f"cannot encode the request as JSON: {exc}")
        last = ""
        for attempt in range(o.retries + 1):
            try:
                return self._attempt(path, payload)
            except _Fatal as exc:
                return GenerationResult(text=None, error=str(exc))
            except _Retryable as exc:
                last = str(exc)
                if attempt == o.retries:
                    break
                wait = o.backoff_s * (2 ** attempt) * (1 + 0.1 * random.random())  # jitter: no thundering herd
                if exc.retry_after is not None:
                    wait = max(wait, min(exc.retry_after, _MAX_RETRY_AFTER_S))
                time.sleep(wait)
            except Exception as exc:  # a bug or an odd answer must cost one row, not the run
                return GenerationResult(text=None, error=f"{type(exc).__name__}: {_one_line(str(exc), 300)}")
        n = o.retries + 1
        return GenerationResult(text=None, error=f"{last} (after {n} attempt{'s' if n > 1 else ''})")

    def generate(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not batch:
            return []
        if self.options.endpoint == "chat":
            for r in batch:
                if r.prompt_mode == "chat" and not (r.extra or {}).get("messages"):
                    raise UsageError(
                        "backend http: endpoint=chat got an already chat-templated prompt without its messages; "
                        "the server would template it twice. Use endpoint=completions (the default) with "
                        "add_special_tokens=false")
        workers = min(self.options.concurrency, len(batch))
        if workers == 1:
            results = [self._one(r) for r in batch]
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evalctx-http") as pool:
                results = list(pool.map(self._one, batch))
        for res in results:
            res.batch_size = workers  # requests in flight together, the client-side "batch"
        for req, res in zip(batch, results):
            self._check_length(req, res)
        if not self._warned_no_usage and any(r.error is None and r.n_prompt_tokens is None for r in results):
            self._warned_no_usage = True
            print(f"evalctx: warning: {self.base_url} returns no usage.prompt_tokens, so prompt lengths are not "
                  "verified against the server's tokenizer (with stream=true the server must support "
                  "stream_options.include_usage)", file=sys.stderr)
        return results

    def _check_length(self, req: GenerationRequest, res: GenerationResult) -> None:
        """Explain the two mismatches that are configuration, not tokenizer, problems (the runner checks the
        rest): a BOS added twice or not at all, and a chat template wrapped around the prompt."""
        n, want = res.n_prompt_tokens, len(req.prompt_ids)
        if res.error is not None or n is None or n == want:
            return
        if self.options.endpoint == "chat" and not (req.extra or {}).get("messages"):
            raise LengthError(
                f"backend http: the server counted {n} prompt tokens for a {want}-token prompt: the chat endpoint "
                "wraps the prompt in the server's chat template. Use endpoint=completions for token-exact prompts")
        if self.options.send == "text" and abs(n - want) == 1:
            fix = "add_special_tokens=false" if n > want else "add_special_tokens=true"
            raise LengthError(
                f"backend http: the server counted {n} prompt tokens for a {want}-token prompt: it likely "
                f"{'added a BOS token the prompt text already has' if n > want else 'did not add the BOS token'}; "
                f"pass --backend-opt {fix}, or send=ids")

    # ------------------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        d = super().info()
        d["options"] = dict(d["options"], api_key="***" if self.options.api_key else None)
        d.update({"base_url": self.base_url, "model": self.model_name, "endpoint": self.options.endpoint,
                  "send": self.options.send, "extra_body": self.extra_body})
        if self._models_answer is None:
            try:
                self._models_answer = self._get_models()
            except (OSError, http.client.HTTPException, ValueError, _Fatal) as exc:
                self._models_answer = {"error": _one_line(str(exc) or type(exc).__name__, 200)}
        d["server_models"] = self._models_answer
        return d

    def row_columns(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_name, "http_endpoint": self.options.endpoint,
                "http_send": self.options.send}


def _int(d: Any, key: str) -> int | None:
    if not isinstance(d, dict):
        return None
    v = d.get(key)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
