"""OpenAI-compatible HTTP backend: vLLM, SGLang, trtllm-serve, llama.cpp, ``evalctx serve`` or any /v1/completions
server.

A row is ``ok`` only when the backend knows the answer is whole and was made from evalctx's exact prompt:

* a finish reason from the server (a stream that ends without one was cut: llama.cpp's server cuts a running
  stream when another request arrives and still ends it with ``[DONE]``);
* the prompt length verified: ``usage.prompt_tokens`` must equal the sample's ``context_length``; a stream without
  usage (llama.cpp ignores ``stream_options.include_usage``) is verified by the same request without streaming,
  sent right after it (a prefix-caching server answers it from its KV cache; its answer must equal the streamed
  one), so TTFT still comes from the stream; a server that sends no usage at all stops the run (exit 2) unless
  ``verify_prompt=false``, whose rows carry the flag ``unverified``;
* the answer not cut by the server's context (``finish_reason: length`` before ``max_tokens``: llama.cpp shortens
  ``max_tokens`` to fit its context and says nothing else).

Anything else is an error row with a one-line message (retried on resume). Transient failures (connection errors,
the deadline, 5xx, 408, 429, a cut stream) are retried with exponential backoff; 4xx, 5xx validation errors and
malformed answers are not. Each request of a batch is one HTTP request; at most ``concurrency`` are in flight. TTFT
is the time to the first streamed chunk that carries generated text, as the client sees it (network and queueing
included). Server presets (:mod:`evalctx.backends.http_servers`) send the fields each server honours for greedy
decoding.

This module builds each request, sends it and judges the answer. What the backend asks the server about itself
(its models, which server it is, its context, the greedy check) is in :mod:`evalctx.backends.http_probes`; why a
prompt was counted differently is told by :mod:`evalctx.backends.http_length_check`.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from evalctx import redact

from evalctx.models import chat_identity
from evalctx.backends.base import Backend, BackendContext
from evalctx.backends.http_client import Answer, Client, Fatal, Retryable, one_line
from evalctx.backends.http_length_check import PromptLengthCheck
from evalctx.backends.http_probes import ServerProbes, _normalize_url, _only_model, _served_models
from evalctx.backends.http_servers import PRESETS, ServerFacts, ServerPreset
from evalctx.errors import UsageError
from evalctx.records import GenerationRequest, GenerationResult

_MAX_RETRY_AFTER_S = 60.0
_WHOLE = {"stop", "length", "eos"}
"""Finish reasons of an answer the model ended itself or at max_tokens (vLLM and SGLang also say "abort")."""
_STREAM_ONLY = ("stream", "stream_options")
_NOT_SAMPLING = {"model", "prompt", "messages", "max_tokens", *_STREAM_ONLY}


def _bos_text(tokenizer: Any, ids: Sequence[int], prompt: str) -> str | None:
    """The text of the special token that starts ``ids`` when ``prompt`` spells it out (a chat template's BOS)."""
    hf = getattr(tokenizer, "hf", None)
    if hf is None or not ids or ids[0] not in set(hf.all_special_ids):
        return None
    text = hf.convert_ids_to_tokens(ids[0])
    return text if isinstance(text, str) and text and prompt.startswith(text) else None


class HTTPBackend(ServerProbes, PromptLengthCheck, Backend):
    name: ClassVar[str] = "http"
    resume_free: ClassVar[tuple[str, ...]] = ("verify_greedy",)

    @dataclass
    class Options:
        base_url: str = "http://127.0.0.1:8000/v1"
        """Server root including the API prefix; a bare ``http://host:port`` gets ``/v1`` appended."""
        model: str | None = None
        """Model name the server serves (default: --model, else the only model /v1/models lists)."""
        server: str = "auto"
        """vllm | sglang | trtllm | llamacpp | transformers | evalctx | openai | auto (recognised from /v1/models
        and /openapi.json): which greedy fields to send and what the server can take (see http_servers)."""
        endpoint: str = "completions"
        """completions (token-exact: the rendered prompt goes as is) | chat (the server applies its template)."""
        send: str = "text"
        """text (the prompt text; the server tokenizes) | ids (the token ids; vLLM, SGLang, trtllm-serve)."""
        stream: bool = True
        """Stream the answer (SSE): TTFT = time to the first streamed token. Without it ttft_s is None."""
        concurrency: int | None = None
        """Requests in flight at once within one batch of the runner (default 4; 1 for llama.cpp)."""
        timeout_s: float = 600.0
        """Deadline per attempt, from sending the request to the end of the answer, however the server trickles."""
        retries: int = 3
        """Extra attempts after a connection error, the deadline, a cut stream, a 5xx, 408 or 429."""
        backoff_s: float = 1.0
        """First wait before a retry; doubled each time (a server's Retry-After wins, up to 60 s)."""
        api_key: str | None = None
        """Bearer token (default: $OPENAI_API_KEY). Prefer the variable: flags end up in the run's command line."""
        extra_body: dict[str, Any] | str | None = None
        """Fields merged into every request body as given, last: a suite table or a JSON object string."""
        temperature: float = 0.0
        add_special_tokens: bool | None = None
        """Sent as the ``add_special_tokens`` field when set. Unset: false for chat-templated prompts (they hold
        their BOS as text) where the server honours the field, else nothing (the server's default)."""
        continue_final_message: bool = True
        """Chat: a final assistant message is a prefill (``continue_final_message``, vLLM/SGLang extension)."""
        verify_prompt: bool = True
        """Verify every prompt length against the server's count (see the module doc). false: rows from a server
        that sends no usage are kept, flagged ``unverified``."""
        verify_greedy: bool = True
        """Before the first sample, send one high-entropy probe prompt three times with the run's settings and stop
        (one line, naming the likely cause) unless the three answers are the same: a server that samples despite
        temperature 0 would make every score a draw. false: skip the check on purpose."""

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
        if o.server != "auto" and o.server not in PRESETS:
            raise UsageError(f"backend http: server must be auto or one of {', '.join(PRESETS)}, not {o.server!r}")
        if o.concurrency is not None and o.concurrency < 1:
            raise UsageError("backend http: concurrency must be >= 1")
        if o.retries < 0 or o.timeout_s <= 0 or o.backoff_s < 0:
            raise UsageError("backend http: retries and backoff_s must be >= 0 and timeout_s > 0")
        self.extra_body = self._parse_extra_body(o.extra_body)
        key = o.api_key or os.environ.get("OPENAI_API_KEY") or None
        redact.remember(key)  # a server's 401 may quote it: masked wherever text is written
        self.client = Client(_normalize_url(o.base_url), key)
        self.base_url = self.client.base_url  # a password in the URL is masked wherever it is shown or stored
        self._models_answer: Any = None
        self._props: Any = None
        self._greedy_checked = False
        self._version_probed = False
        self._warned_unverified = False
        self._answers = self._answers_with_cache_count = 0
        """ok answers, and those that said how many prompt tokens came from the server's prefix cache."""
        if o.server == "auto" or not (o.model or ctx.model):
            self._models_answer = _served_models(self.client)
        self.model_name = o.model or ctx.model or _only_model(self._models_answer)
        self.facts = self._recognise() if o.server == "auto" else ServerFacts(o.server, "server option")
        self.preset: ServerPreset = PRESETS[self.facts.preset or "openai"]
        if o.send == "ids" and not self.preset.takes_ids:
            raise UsageError(f"backend http: the {self.preset.name} server takes the prompt as text only (a list "
                             "of token ids gets HTTP 500): use send=text")
        self.concurrency = o.concurrency or (1 if self.preset.serial else 4)
        if self.preset.serial and self.concurrency > 1:
            self._warn(f"the {self.preset.name} server runs one request at a time and cuts a running stream when "
                       f"another arrives: concurrency={self.concurrency} turns answers into retried errors")

    @classmethod
    def default_label(cls, options: Any, model: str | None) -> str | None:
        """The served model's name (``model``, else the only model in /v1/models), without a path."""
        name = options.model or model
        if not name:
            key = options.api_key or os.environ.get("OPENAI_API_KEY") or None
            name = _only_model(_served_models(Client(_normalize_url(options.base_url), key)))
        return Path(name).name or name

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
                             f"extra_body='{{\"top_p\": 1.0}}' ({exc})") from None
        if not isinstance(d, dict):
            raise UsageError("backend http: extra_body must be a JSON object (a table in the suite file)")
        return d

    def _warn(self, message: str) -> None:
        print(f"evalctx: warning: backend http: {redact.mask_text(message)}", file=sys.stderr)

    # ------------------------------------------------------------------------------------------------------
    def _prompt_text(self, req: GenerationRequest) -> tuple[str, bool | None]:
        """The prompt text to send and the ``add_special_tokens`` field to send with it (None: none)."""
        if self.options.add_special_tokens is not None:
            return req.prompt, self.options.add_special_tokens
        if req.add_special_tokens:
            return req.prompt, None  # a raw prompt: every server adds the BOS by default, like the tokenizer
        if self.preset.honours_add_special_tokens:
            return req.prompt, False
        bos = _bos_text(self.ctx.tokenizer, req.prompt_ids, req.prompt)
        return (req.prompt[len(bos):] if bos else req.prompt), None  # the server adds the BOS itself

    def _body(self, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        o = self.options
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": req.max_new_tokens,
                                "temperature": o.temperature, **self.preset.neutral}
        if o.endpoint == "completions":
            path = "/completions"
            if o.send == "ids":
                body["prompt"] = list(req.prompt_ids)
            else:
                body["prompt"], add_special = self._prompt_text(req)
                if add_special is not None:
                    body["add_special_tokens"] = add_special
        else:
            path = "/chat/completions"
            messages = req.extra.get("messages") if req.extra else None
            if messages and self.ctx.tokenizer is not None and chat_identity.uses_date(self.ctx.tokenizer):
                raise UsageError("backend http: the chat template writes the date, and endpoint=chat lets the server "
                                 "render it with its own today, not the run's pinned day (the prompts evalctx "
                                 "built and identified): use endpoint=completions (the default)")
            if messages:
                messages = list(messages)
                if messages[-1].get("role") == "assistant" and o.continue_final_message:
                    if not self.preset.continues_messages:
                        raise UsageError(f"backend http: the {self.preset.name} server refuses continue_final_message "
                                         "(HTTP 422), so the chat endpoint cannot continue the answer prefix: use "
                                         "endpoint=completions (the default)")
                    body["continue_final_message"] = True
                    body["add_generation_prompt"] = False
            else:
                messages = [{"role": "user", "content": req.prompt}]
            body["messages"] = messages
        if o.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body.update(self.extra_body)  # last: a user's explicit field wins over ours
        return self.client.prefix + path, body

    def _post(self, path: str, body: dict[str, Any]) -> Answer:
        return self.client.post(path, json.dumps(body).encode("utf-8"), self.options.timeout_s)

    def _attempt(self, req: GenerationRequest, path: str, body: dict[str, Any]) -> GenerationResult:
        """One attempt, judged: a GenerationResult only for a whole, verified answer (else Retryable / Fatal)."""
        ans = self._post(path, body)
        unstreamed = {k: v for k, v in body.items() if k not in _STREAM_ONLY}
        if ans.streamed and ans.n_events == 0:
            self._explain_empty_stream(path, unstreamed)
        if ans.finish_reason is None:
            hint = (f"; llama.cpp's server does that to a running stream when another request arrives: "
                    f"concurrency=1 avoids it" if self.concurrency > 1 and ans.streamed else "")
            raise Retryable(f"the answer ended without a finish_reason after {one_line(repr(ans.text), 60)}: the "
                            f"server cut it{hint}")
        if ans.finish_reason not in _WHOLE:
            raise Retryable(f"finish_reason {ans.finish_reason!r}: the server did not finish the answer")
        flags: list[str] = []
        if ans.prompt_tokens is None:
            if not self.options.verify_prompt:
                flags.append("unverified")
                if not self._warned_unverified:
                    self._warned_unverified = True
                    self._warn(f"{self.base_url} sent no token counts and verify_prompt=false: prompt lengths and "
                               "answer completeness are unchecked; rows are flagged 'unverified'")
            elif ans.streamed:
                ans = self._verify_by_replay(path, unstreamed, ans)
            else:
                raise self._no_usage_error()
        if ans.truncated:
            raise Fatal("the server cut or shifted the context to make room (truncated: true): the model did not "
                        "see the whole prompt; serve with a context of at least prompt + max_tokens tokens "
                        "(llama.cpp: --ctx-size, and --no-context-shift)")
        ans = self._count_eos(req, ans)
        if ans.completion_tokens is not None and ans.completion_tokens > req.max_new_tokens + 1:
            # one more than asked is a server that counts its stopping EOS; more is a count of something else
            raise Fatal(f"the server reports {ans.completion_tokens} completion tokens for max_tokens "
                        f"{req.max_new_tokens}: its usage cannot be trusted")
        n_prompt = ans.prompt_tokens
        if ans.finish_reason == "length" and ans.completion_tokens is not None \
                and ans.completion_tokens < req.max_new_tokens:
            need = (n_prompt or len(req.prompt_ids)) + req.max_new_tokens
            raise Fatal(f"the server stopped the answer after {ans.completion_tokens} of max_tokens "
                        f"{req.max_new_tokens} tokens (finish_reason length): the prompt plus max_tokens exceed its "
                        f"context window; serve with a context of at least {need} tokens"
                        + (f" (--n_ctx {-(-need // 256) * 256}: llama-cpp-python needs a multiple of 256)"
                           if self.preset.name == "llamacpp" else ""))
        return GenerationResult(
            text=ans.text, n_prompt_tokens=n_prompt, n_output_tokens=ans.completion_tokens,
            latency_s=ans.latency_s, ttft_s=ans.ttft_s, finish_reason=ans.finish_reason,
            n_cached_prompt_tokens=ans.cached_tokens, flags=flags)

    def _count_eos(self, req: GenerationRequest, ans: Answer) -> Answer:
        """A server whose ``completion_tokens`` counts the end token (``counts_eos``): the count without it, and
        ``stop`` where answer plus end token filled ``max_tokens`` exactly (it says ``length`` then), told by the
        answer text being one token shorter than the count."""
        c = ans.completion_tokens
        if not self.preset.counts_eos or c is None:
            return ans
        if ans.finish_reason == "stop":
            return dataclasses.replace(ans, completion_tokens=max(c - 1, 0))
        tok = self.ctx.tokenizer
        if ans.finish_reason == "length" and c == req.max_new_tokens and tok is not None \
                and len(tok.encode(ans.text)) == c - 1:
            return dataclasses.replace(ans, completion_tokens=c - 1, finish_reason="stop")
        return ans

    def _no_usage_error(self) -> UsageError:
        return UsageError(f"backend http: {self.base_url} sends no usage.prompt_tokens, even without streaming, so "
                          "prompt lengths cannot be verified; pass --backend-opt verify_prompt=false to run "
                          "unverified on purpose (rows get the flag 'unverified')")

    def _verify_by_replay(self, path: str, unstreamed: dict[str, Any], streamed: Answer) -> Answer:
        """The streamed answer, with the token counts of the same request sent without streaming (whose answer
        must be the same: greedy decoding of the same prompt)."""
        again = self._post(path, unstreamed)
        if again.prompt_tokens is None:
            raise self._no_usage_error()
        if (again.text, again.finish_reason) != (streamed.text, streamed.finish_reason):
            raise Retryable(f"the streamed answer {one_line(repr(streamed.text), 60)} ({streamed.finish_reason}) "
                            f"differs from the same request without streaming {one_line(repr(again.text), 60)} "
                            f"({again.finish_reason}): the stream was cut or the server does not decode "
                            "deterministically")
        # Cached tokens of the replay count a cache the stream itself just filled: the stream's own count (llama.cpp
        # sends timings.cache_n in its last chunk) or none.
        return dataclasses.replace(streamed, prompt_tokens=again.prompt_tokens,
                                   completion_tokens=again.completion_tokens)

    def _explain_empty_stream(self, path: str, unstreamed: dict[str, Any]) -> None:
        """An empty 200 stream says nothing; the same request without streaming gets the server's own refusal
        (llama.cpp: a prompt over its context is a 400 without streaming and an empty stream with it)."""
        try:
            self._post(path, unstreamed)
        except Fatal as exc:
            raise Fatal(f"{exc} (the streamed request got an empty answer; this is the same request without "
                        "streaming)") from None
        raise Retryable(f"the server at {self.base_url} answered the stream with an empty body")

    def _one(self, req: GenerationRequest) -> GenerationResult:
        o = self.options
        try:
            path, body = self._body(req)
            json.dumps(body)
        except (TypeError, ValueError) as exc:
            return GenerationResult(text=None, error=f"cannot encode the request as JSON: {exc}")
        last = ""
        for attempt in range(o.retries + 1):
            try:
                return self._attempt(req, path, body)
            except Fatal as exc:
                return GenerationResult(text=None, error=str(exc))
            except Retryable as exc:
                last = str(exc)
                if attempt == o.retries:
                    break
                wait = o.backoff_s * (2 ** attempt) * (1 + 0.1 * random.random())  # jitter: no thundering herd
                if exc.retry_after is not None:
                    wait = max(wait, min(exc.retry_after, _MAX_RETRY_AFTER_S))
                time.sleep(wait)
            except UsageError:
                raise  # the configuration, not this sample: stop the run
            except Exception as exc:  # a bug or an odd answer must cost one row, not the run
                return GenerationResult(text=None, error=f"{type(exc).__name__}: {one_line(str(exc), 300)}")
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
                        "the server would template it twice. Use endpoint=completions (the default)")
        workers = min(self.concurrency, len(batch))
        if workers == 1:
            results = [self._one(r) for r in batch]
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evalctx-http") as pool:
                results = list(pool.map(self._one, batch))
        for res in results:
            res.batch_size = workers  # requests in flight together, the client-side "batch"
        for req, res in zip(batch, results):
            self._check_length(req, res)
        ok = [r for r in results if r.error is None]
        self._answers += len(ok)
        self._answers_with_cache_count += sum(r.n_cached_prompt_tokens is not None for r in ok)
        return results

    def close(self) -> None:
        # The runner sends each length's prompts in token-id order so that prefix caches hit; a server that never
        # says so leaves every row's n_cached_prompt_tokens unknown, and latency tables time unknown rows as cold.
        if self._answers > 1 and not self._answers_with_cache_count:
            self._warn(f"{self.base_url} reported no cached prompt tokens in any of {self._answers} answers: if it "
                       "caches prefixes (vLLM and SGLang do by default), prompts sent in prefix order reused them and "
                       "their TTFT and latency count as cold; serve vLLM with --enable-prompt-tokens-details, SGLang "
                       "with --enable-cache-report, or turn the prefix cache off for timing (docs/http.md)")

    def info(self) -> dict[str, Any]:
        d = super().info()
        d["options"] = dict(d["options"], api_key="***" if self.options.api_key else None)
        if self._models_answer is None:
            try:
                self._models_answer = self.client.get_json(self.client.prefix + "/models")
            except (OSError, http.client.HTTPException, ValueError, Fatal) as exc:
                self._models_answer = {"error": one_line(str(exc) or type(exc).__name__, 200)}
        if self.facts.version is None and not self._version_probed:
            self._version_probed = True
            try:  # vLLM and trtllm-serve answer /version
                v = self.client.get_json("/version", timeout=5.0)
                self.facts.version = str(v["version"]) if isinstance(v, dict) and v.get("version") else None
            except (OSError, http.client.HTTPException, ValueError, Fatal):
                pass
        probe = GenerationRequest(sample_id="", prompt_ids=[], prompt="", max_new_tokens=0)
        sampling = {k: v for k, v in self._body(probe)[1].items() if k not in _NOT_SAMPLING}
        d["options"] = {**d["options"], "base_url": self.base_url}  # the password-masked URL
        d.update({"base_url": self.base_url, "model": self.model_name, "endpoint": self.options.endpoint,
                  "send": self.options.send, "extra_body": self.extra_body, "server_models": self._models_answer,
                  "server": {"preset": self.preset.name, "recognised_by": self.facts.how,
                             "version": self.facts.version, "max_model_len": self.facts.max_model_len},
                  "sampling": sampling, "concurrency": self.concurrency})
        return d

    def row_columns(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_name, "http_endpoint": self.options.endpoint,
                "http_send": self.options.send, "http_server": self.preset.name}
