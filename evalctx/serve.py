"""A small OpenAI-compatible server in front of any evalctx backend (``evalctx serve``).

It answers GET /v1/models, GET /health, POST /v1/completions and POST /v1/chat/completions with greedy decoding
only, so the http backend (or any OpenAI client) can drive a model that evalctx loads itself, and so the http
path can be checked against the direct one answer for answer.

One model, one lock: requests are generated one at a time, in arrival order of the lock. What a crowd of clients
can hold is bounded (:class:`ServeLimits`): a listen queue long enough for a benchmark's burst, at most
``max_connections`` handler threads (further connections wait in the queue), a read timeout on every socket (a
half-sent request or an idle keep-alive connection is dropped), a cap per request body and a cap on the bodies held
at once (a request over it waits for room, then gets 503). Streaming is honest but
not incremental: the answer is sent as one chunk once generation ends (the backends are batch-synchronous), so
the first chunk never precedes the first token, and TTFT seen by a client is queueing + prefill + decode. The
backend's own timings travel in each answer under ``evalctx_timings``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from evalctx.backends.base import Backend
from evalctx.records import GenerationRequest

MIB = 1024 * 1024
_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class ServeLimits:
    """What concurrent clients may hold of the server (``evalctx serve`` flags of the same names)."""

    backlog: int = 1024
    """Listen queue length (the kernel caps it at net.core.somaxconn); the stdlib's 5 resets bursts."""
    max_connections: int = 64
    """Connections handled at once, one thread each; more wait in the listen queue."""
    read_timeout_s: float = 60.0
    """Per socket read or write: a client silent this long is dropped (a half-sent request, an idle keep-alive)."""
    max_body_bytes: int = 64 * MIB
    """Per request (413 above): a 1M-token prompt is ~8 MB of JSON as token ids, ~4-5 MB as text."""
    max_buffered_bytes: int = 256 * MIB
    """Request bodies held at once; a request that would pass it waits up to ``read_timeout_s``, then gets 503."""
    max_prompt_tokens: int = 1_100_000
    """Longest prompt taken (400 above): one larger prompt would hold the model for many minutes."""
    max_new_tokens: int = 1 << 16
    """Largest ``max_tokens`` taken (400 above)."""


class _ByteBudget:
    """A counting semaphore in bytes: bounds the request bodies held in memory at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, timeout: float) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + n <= self.capacity, timeout):
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class ClientGone(Exception):
    """The client closed its connection before its request reached the model."""


class RequestError(Exception):
    """A request the server refuses: becomes an OpenAI-style JSON error with ``status``."""

    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.param = param


class ModelServer:
    """The state behind the handler: one backend, its tokenizer, one lock."""

    def __init__(self, backend: Backend, tokenizer: Any, model_name: str, max_model_len: int | None = None,
                 limits: ServeLimits = ServeLimits()) -> None:
        self.backend = backend
        self.limits = limits
        self.body_budget = _ByteBudget(limits.max_buffered_bytes)
        self.tokenizer = tokenizer
        self.model_name = model_name
        # Shown in /v1/models only: like the hf backend, the server never refuses a prompt past the trained
        # window (how a model extrapolates is what a long-context evaluation measures).
        self.max_model_len = max_model_len
        self.created = int(time.time())
        self.lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        card: dict[str, Any] = {"id": self.model_name, "object": "model", "created": self.created,
                                "owned_by": "evalctx", "backend": self.backend.name}
        if self.max_model_len:
            card["max_model_len"] = self.max_model_len
        return {"object": "list", "data": [card]}

    def _check_common(self, body: dict[str, Any]) -> tuple[int, bool]:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(f"The model {model!r} does not exist; this server serves {self.model_name!r}",
                               status=404, type_="NotFoundError", param="model")
        temp = body.get("temperature")
        if temp is not None and (not isinstance(temp, (int, float)) or isinstance(temp, bool) or temp != 0):
            raise RequestError(f"evalctx serve decodes greedily only: temperature must be 0 or absent, not {temp!r}",
                               param="temperature")
        for key, neutral in (("n", 1), ("best_of", 1), ("presence_penalty", 0), ("frequency_penalty", 0),
                             ("repetition_penalty", 1), ("top_k", None)):
            v = body.get(key)
            if v is not None and v != neutral and not (key == "top_k" and v in (-1, 0, 1)):
                raise RequestError(f"evalctx serve decodes greedily only: {key}={v!r} is not supported",
                                   param=key)
        for key in ("stop", "logprobs", "top_logprobs", "suffix", "tools"):
            if body.get(key):
                raise RequestError(f"evalctx serve does not support {key!r}", param=key)
        if body.get("echo"):
            raise RequestError("evalctx serve does not support echo", param="echo")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", _DEFAULT_MAX_TOKENS))
        if max_tokens is None:
            max_tokens = _DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, not {max_tokens!r}", param="max_tokens")
        if max_tokens > self.limits.max_new_tokens:
            raise RequestError(f"max_tokens {max_tokens} is over this server's {self.limits.max_new_tokens} "
                               "(evalctx serve --max-new-tokens-cap)", param="max_tokens")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false", param="stream")
        return max_tokens, stream

    @staticmethod
    def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
        v = body.get(key, default)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise RequestError(f"{key} must be true or false", param=key)
        return v

    def _prompt_ids(self, prompt: Any, add_special: bool) -> tuple[list[int], str]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one, as some clients send it
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty", param="prompt")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError("prompt is not valid Unicode text (a lone surrogate)", param="prompt") from None
            return self._capped(self.tokenizer.encode(prompt, add_special_tokens=add_special)), prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            vocab = self._vocab_size()
            if any(t < 0 or (vocab is not None and t >= vocab) for t in prompt):
                raise RequestError(f"prompt has token ids outside the vocabulary (0..{vocab})", param="prompt")
            return self._capped(list(prompt)), self.tokenizer.decode(prompt)
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise RequestError("one prompt per request, please (send several requests)", param="prompt")
        raise RequestError("prompt must be a string or a non-empty list of token ids", param="prompt")

    def _capped(self, ids: list[int]) -> list[int]:
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(f"prompt of {len(ids)} tokens is over this server's {self.limits.max_prompt_tokens} "
                               "(evalctx serve --max-prompt-tokens)", param="prompt")
        return ids

    def _vocab_size(self) -> int | None:
        """Ids the model has rows for (an id beyond can break a CUDA device for every later request): the
        backend model's embedding table, else the tokenizer's whole vocabulary."""
        model = getattr(self.backend, "model", None)
        if model is not None and hasattr(model, "get_input_embeddings"):
            return int(model.get_input_embeddings().num_embeddings)
        hf = getattr(self.tokenizer, "hf", None)
        if hf is not None:
            return len(hf)
        size = getattr(self.tokenizer, "vocab_size", None)
        return int(size) if isinstance(size, int) else None

    def _render_chat(self, body: dict[str, Any]) -> str:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list", param="messages")
        clean: list[dict[str, str]] = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError("each message needs a role and content", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise RequestError("message content must be text", param="messages")
            clean.append({"role": m["role"], "content": content})
        cont = self._flag(body, "continue_final_message", False)
        gen = self._flag(body, "add_generation_prompt", not cont)
        if cont and gen:
            raise RequestError("continue_final_message and add_generation_prompt cannot both be true")
        if cont and clean[-1]["role"] != "assistant":
            raise RequestError("continue_final_message needs a final assistant message", param="messages")
        tok = self.tokenizer
        if not tok.has_chat_template():
            raise RequestError(f"the served tokenizer {getattr(tok, 'name', '')!r} has no chat template: "
                               "use /v1/completions")
        hf = getattr(tok, "hf", None)
        if hf is not None:  # the template's own handling of prefills and of no generation prompt
            return hf.apply_chat_template(clean, tokenize=False, add_generation_prompt=gen,
                                          continue_final_message=cont)
        if cont:
            return tok.apply_chat_template(clean[:-1]) + clean[-1]["content"]
        if not gen:
            raise RequestError("add_generation_prompt=false needs a Hugging Face tokenizer's template")
        return tok.apply_chat_template(clean)

    # ------------------------------------------------------------------------------------------------------
    def complete(self, body: dict[str, Any], chat: bool,
                 client_gone: Any = None) -> tuple[dict[str, Any], bool, bool]:
        """Run one request; returns (the answer fields, stream, include_usage). ``client_gone()`` is asked once the
        model is free: a request whose client hung up while it waited is dropped, not computed for no one."""
        max_tokens, stream = self._check_common(body)
        if chat:
            text = self._render_chat(body)
            # The template already holds the BOS it wants (the vLLM chat default).
            ids, prompt = self._prompt_ids(text, self._flag(body, "add_special_tokens", False))
        else:
            if "prompt" not in body:
                raise RequestError("missing field 'prompt'", param="prompt")
            ids, prompt = self._prompt_ids(body["prompt"], self._flag(body, "add_special_tokens", True))
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
        req = GenerationRequest(sample_id=uuid.uuid4().hex, prompt_ids=ids, prompt=prompt,
                                max_new_tokens=max_tokens, add_special_tokens=False,
                                prompt_mode="chat" if chat else "raw")
        t_queue = time.perf_counter()
        with self.lock:
            if client_gone is not None and client_gone():
                raise ClientGone()
            t0 = time.perf_counter()
            res = self.backend.generate([req])[0]
            t1 = time.perf_counter()
        if res.error is not None or res.text is None:
            raise RequestError(f"generation failed: {res.error or 'no text'}", status=500, type_="server_error")
        n_out = res.n_output_tokens if res.n_output_tokens is not None \
            else len(self.tokenizer.encode(res.text, add_special_tokens=False))
        n_prompt = res.n_prompt_tokens if res.n_prompt_tokens is not None else len(ids)
        return {
            "text": res.text,
            "finish_reason": res.finish_reason or "length",
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
            "evalctx_timings": {"queue_s": t0 - t_queue, "generate_s": t1 - t0, "ttft_s": res.ttft_s,
                                "latency_s": res.latency_s},
        }, stream, include_usage


def _answer_json(result: dict[str, Any], chat: bool, model: str) -> dict[str, Any]:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                  "finish_reason": result["finish_reason"], "logprobs": None}
    else:
        choice = {"index": 0, "text": result["text"], "finish_reason": result["finish_reason"], "logprobs": None}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": result["usage"],
            "evalctx_timings": result["evalctx_timings"]}


def _answer_chunks(result: dict[str, Any], chat: bool, model: str, include_usage: bool) -> list[dict[str, Any]]:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model}

    def choice(text: str | None, finish: str | None) -> dict[str, Any]:
        if chat:
            delta = {"role": "assistant", "content": text} if text is not None else {}
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

    chunks = [dict(base, choices=[choice(result["text"], None)]),
              dict(base, choices=[choice(None if chat else "", result["finish_reason"])])]
    if include_usage:
        chunks.append(dict(base, choices=[], usage=result["usage"], evalctx_timings=result["evalctx_timings"]))
    return chunks


class _Handler(BaseHTTPRequestHandler):
    server_version = "evalctx-serve"
    protocol_version = "HTTP/1.1"
    model_server: ModelServer  # set on the subclass made by make_server
    quiet = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        if not self.quiet:
            sys.stderr.write(f"evalctx serve: {self.address_string()} {format % args}\n")

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: RequestError) -> None:
        self._send_json(err.status, {"error": {"message": str(err), "type": err.type, "param": err.param,
                                               "code": err.status}})

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (a malformed request line, oversized headers, an unsupported method) as
        OpenAI-style JSON, like every other answer, instead of an HTML page."""
        self.close_connection = True
        try:
            self._send_json(code, {"error": {"message": message or explain or f"HTTP {code}",
                                             "type": "invalid_request_error", "param": None, "code": code}})
        except OSError:
            pass

    def _client_gone(self) -> bool:
        """Whether the peer has closed the connection (readable with nothing to read)."""
        import select
        import socket

        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._send_error(RequestError(f"method {self.command} is not allowed: GET /v1/models, POST "
                                      "/v1/completions or /v1/chat/completions", status=405))

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        path = self._path()
        if path in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send_json(200, self.model_server.models())
        else:
            self._send_error(RequestError(f"no route GET {path}", status=404, type_="NotFoundError"))

    def _read_body(self) -> tuple[dict[str, Any], int]:
        """The JSON body and the bytes it holds of the server's body budget (release them when done)."""
        limits = self.model_server.limits
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("the request needs a Content-Length header and a JSON body", status=411)
        n = int(length)
        if n > limits.max_body_bytes:
            raise RequestError(f"request body of {n} bytes is over this server's {limits.max_body_bytes} "
                               "(evalctx serve --max-body-mb)", status=413)
        if not self.model_server.body_budget.acquire(n, limits.read_timeout_s):
            raise RequestError("server busy: too many request bodies held at once; retry later", status=503,
                               type_="server_error")
        try:
            raw = self.rfile.read(n)
            if len(raw) < n:
                raise RequestError("the body ended before Content-Length bytes")
            body = json.loads(raw)
        except ValueError as exc:
            self.model_server.body_budget.release(n)
            raise RequestError(f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            self.model_server.body_budget.release(n)
            raise RequestError("the body is nested too deeply to be a request") from None
        except BaseException:
            self.model_server.body_budget.release(n)
            raise
        if not isinstance(body, dict):
            self.model_server.body_budget.release(n)
            raise RequestError("the body must be a JSON object")
        return body, n

    def do_POST(self) -> None:  # noqa: N802
        path = self._path()
        chat = path == "/v1/chat/completions"
        if not chat and path != "/v1/completions":
            self.close_connection = True  # the unread body would be read as the next request
            self._send_error(RequestError(f"no route POST {path}", status=404, type_="NotFoundError"))
            return
        ms = self.model_server
        try:
            body, held = self._read_body()
        except RequestError as err:
            self.close_connection = True  # the body may be unread: it must not be parsed as the next request
            self._send_error(err)
            return
        except TimeoutError:  # the client stopped sending (the handler's socket timeout): drop it
            self.close_connection = True
            return
        try:
            result, stream, include_usage = ms.complete(body, chat, self._client_gone)
        except ClientGone:
            self.close_connection = True
            return
        except RequestError as err:
            self._send_error(err)
            return
        except Exception as exc:  # a backend bug: tell the client, keep serving
            self._send_error(RequestError(f"{type(exc).__name__}: {exc}", status=500, type_="server_error"))
            return
        finally:
            ms.body_budget.release(held)
        if not stream:
            self._send_json(200, _answer_json(result, chat, ms.model_name))
            return
        # No chunked encoding: the stream ends when the connection closes, which every SSE client accepts.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for chunk in _answer_chunks(result, chat, ms.model_name, include_usage):
            self.wfile.write(b"data: " + json.dumps(chunk).encode("utf-8") + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class _BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most ``max_connections`` handler threads: the accept loop waits for a free slot
    (further clients wait in the listen queue) instead of starting a thread per connection."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, limits: ServeLimits) -> None:
        self.request_queue_size = limits.backlog  # read by server_activate() inside __init__
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._closing = False
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        while not self._slots.acquire(timeout=0.2):
            if self._closing:
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        self._closing = True
        super().shutdown()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up or went silent is routine for a server: one line, not socketserver's traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            if not self.RequestHandlerClass.quiet:  # type: ignore[attr-defined]
                sys.stderr.write(f"evalctx serve: {client_address[0]}: {type(exc).__name__}: {exc}\n")
            return
        super().handle_error(request, client_address)


def make_server(backend: Backend, tokenizer: Any, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                max_model_len: int | None = None, quiet: bool = False,
                limits: ServeLimits = ServeLimits()) -> ThreadingHTTPServer:
    """A bound, not yet serving server; call ``serve_forever()`` (port 0 picks a free one: ``server_address``)."""
    ms = ModelServer(backend, tokenizer, model_name, max_model_len, limits)
    handler = type("EvalctxHandler", (_Handler,), {"model_server": ms, "quiet": quiet,
                                                   "timeout": limits.read_timeout_s})
    return _BoundedServer((host, port), handler, limits)
