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
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import random
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from evalctx import redact

from evalctx.models import chat_identity
from evalctx.backends.base import Backend, BackendContext
from evalctx.backends.http_client import Answer, Client, Fatal, Retryable, one_line
from evalctx.backends.http_servers import PRESETS, ServerFacts, ServerPreset, detect
from evalctx.errors import LengthError, RefusedBeforeWork, UsageError
from evalctx.records import GenerationRequest, GenerationResult

_MAX_RETRY_AFTER_S = 60.0
_WHOLE = {"stop", "length", "eos"}
"""Finish reasons of an answer the model ended itself or at max_tokens (vLLM and SGLang also say "abort")."""
_STREAM_ONLY = ("stream", "stream_options")
_NOT_SAMPLING = {"model", "prompt", "messages", "max_tokens", *_STREAM_ONLY}


def _normalize_url(url: str) -> str:
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UsageError(f"backend http: base_url must look like http://HOST:PORT/v1, not {url!r}")
    path = parsed.path.rstrip("/") or "/v1"  # every OpenAI-compatible server mounts its API there
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


def _served_models(client: Client) -> Any:
    try:
        return client.get_json(client.prefix + "/models")
    except (OSError, http.client.HTTPException, ValueError, Fatal) as exc:
        raise UsageError(f"backend http: {client.base_url}/models did not answer ({one_line(str(exc), 160)}): "
                         "is the server up at base_url?") from None


def _prefill_insert(tokenizer: Any, req: GenerationRequest) -> str | None:
    """What the tokenizer's chat template writes between the generation prompt and a continued final assistant
    message (``continue_final_message``) that evalctx's prompt does not have, or None (no difference, or no
    Hugging Face template to ask)."""
    hf = getattr(tokenizer, "hf", None)
    messages = (req.extra or {}).get("messages")
    if hf is None or not messages:
        return None
    try:
        continued = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    except Exception:  # a template that refuses to continue a message: nothing to say about it here
        return None
    ours = req.prompt
    if continued == ours:
        return None
    start = next((i for i, (a, b) in enumerate(zip(continued, ours)) if a != b), min(len(continued), len(ours)))
    end = 0
    while end < min(len(continued), len(ours)) - start and continued[-1 - end] == ours[-1 - end]:
        end += 1
    extra = continued[start:len(continued) - end]
    return extra if extra and len(continued) > len(ours) else None


_PROBE_WORDS = ("orchard", "lantern", "quarry", "velvet", "harbor", "thistle", "compass", "meadow", "glacier",
                "pepper", "saddle", "violin", "ember", "canyon", "ribbon", "falcon", "marble", "tundra", "walnut",
                "beacon", "cobalt", "drizzle", "fennel", "gravel", "hollow", "juniper", "kettle", "lichen")
"""The greedy check's probe: unrelated words, whose continuation has no one likely next token."""


def _card(models: Any, name: str) -> dict[str, Any]:
    """The /v1/models entry whose id is ``name`` (else the only one; else empty)."""
    data = models.get("data") if isinstance(models, dict) else None
    cards = [c for c in data if isinstance(c, dict)] if isinstance(data, list) else []
    return next((c for c in cards if c.get("id") == name), cards[0] if len(cards) == 1 else {})


def _only_model(models: Any) -> str:
    data = models.get("data") if isinstance(models, dict) else None
    ids = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
    if len(ids) != 1 or not ids[0]:
        raise UsageError(f"backend http: the server lists {len(ids)} models ({', '.join(map(str, ids))}): "
                         "pass --backend-opt model=NAME")
    return str(ids[0])


def _bos_text(tokenizer: Any, ids: Sequence[int], prompt: str) -> str | None:
    """The text of the special token that starts ``ids`` when ``prompt`` spells it out (a chat template's BOS)."""
    hf = getattr(tokenizer, "hf", None)
    if hf is None or not ids or ids[0] not in set(hf.all_special_ids):
        return None
    text = hf.convert_ids_to_tokens(ids[0])
    return text if isinstance(text, str) and text and prompt.startswith(text) else None


class HTTPBackend(Backend):
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

    def _recognise(self) -> ServerFacts:
        try:
            openapi = self.client.get_json("/openapi.json")
        except (OSError, http.client.HTTPException, ValueError, Fatal):
            openapi = None
        facts = detect(self._models_answer, openapi)
        if facts.preset is None:
            self._warn(f"the server at {self.base_url} is not one evalctx knows ({facts.how}): evalctx sends "
                       "temperature 0 with the OpenAI API's frequency and presence penalties at 0 only, which "
                       "every OpenAI-compatible server takes; a server whose defaults add a repetition penalty "
                       "does not decode greedily then (the greedy check catches a server that samples). If you "
                       f"know the server, pass --backend-opt server=NAME ({', '.join(p for p in PRESETS if p != 'openai')})")
        return facts

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

    def _check_length(self, req: GenerationRequest, res: GenerationResult) -> None:
        """Stop the run at a prompt the server counted differently, saying why from what was actually sent."""
        n, want = res.n_prompt_tokens, len(req.prompt_ids)
        if res.error is not None or n is None or n == want:
            return
        o = self.options
        head = f"backend http: the server counted {n} prompt tokens for a {want}-token prompt"
        if o.endpoint == "chat":
            if not (req.extra or {}).get("messages"):
                raise LengthError(f"{head}: the chat endpoint wraps the prompt in the server's chat template. Use "
                                  "endpoint=completions for token-exact prompts")
            prefix = req.extra["messages"][-1].get("role") == "assistant"
            if prefix and not o.continue_final_message:
                raise LengthError(f"{head} rendered from the sample's chat messages: with continue_final_message="
                                  "false the server closes the answer prefix (the final assistant message) as a "
                                  "finished turn. Drop continue_final_message=false, or use endpoint=completions "
                                  "(the default): the prompt then goes as evalctx rendered it")
            inserted = _prefill_insert(self.ctx.tokenizer, req) if prefix else None
            if inserted:
                raise LengthError(
                    f"{head} rendered from the sample's chat messages: the chat template renders the answer prefix "
                    f"continued as an assistant turn (continue_final_message) with {inserted!r} before it, text that "
                    f"its generation prompt, which evalctx measured, does not have (an empty think block of a "
                    f"Qwen3-style template). Use endpoint=completions (the default): the prompt then goes as evalctx "
                    f"rendered it")
            prefill = " or ignores continue_final_message (llama.cpp does) and closes the answer prefix" \
                if prefix else ""
            raise LengthError(f"{head} rendered from the sample's chat messages: the server's chat template differs "
                              f"from --tokenizer's{prefill}. Use endpoint=completions (the default): the prompt then "
                              "goes as evalctx rendered it")
        if o.send == "ids":
            raise LengthError(f"{head} sent as token ids: the server does not take the ids as given")
        prompt, add_special = self._prompt_text(req)
        ids_fix = ", or send=ids" if self.preset.takes_ids else ""
        own = "this server adds it whatever it is sent, so --tokenizer must be the served model's own"
        if n == want + 1 and (add_special is False or len(prompt) < len(req.prompt)):
            how = "add_special_tokens=false was sent" if add_special is False else "its BOS text was left out"
            raise LengthError(f"{head}: it added a BOS token although {how}; the server does not honour that. "
                              + ("Use send=ids" if self.preset.takes_ids else "Use prompt_mode raw"))
        added_bos = req.add_special_tokens and self._tokenizer_added_bos(req)
        if n == want + 1 and add_special is None and not added_bos:
            # A chat-templated prompt gets here only from a server that ignores add_special_tokens, with no BOS
            # text to leave out (see _prompt_text): its template starts with none.
            held = "--tokenizer does not add" if req.add_special_tokens \
                else "that --tokenizer's chat template does not start with"
            fix = f"pass --backend-opt add_special_tokens=false{ids_fix}" \
                if self.preset.honours_add_special_tokens else own
            raise LengthError(f"{head}: it added a BOS token {held}; {fix}")
        if n == want - 1 and add_special is None and added_bos:
            fix = f"pass --backend-opt add_special_tokens=true{ids_fix}" \
                if self.preset.honours_add_special_tokens else own.replace("adds it", "leaves it out")
            raise LengthError(f"{head}: it did not add the BOS token that --tokenizer adds; {fix}")
        raise LengthError(f"{head}: its tokenizer splits the prompt text differently from --tokenizer "
                          f"{getattr(self.ctx.tokenizer, 'name', '')}; pass the served model's own tokenizer"
                          + (", or send=ids so that the server gets evalctx's token ids" if self.preset.takes_ids
                             else ""))

    def _tokenizer_added_bos(self, req: GenerationRequest) -> bool:
        """Whether the prompt's ids start with a token the tokenizer added (a BOS), not one of the text."""
        tok = self.ctx.tokenizer
        plain = tok.encode(req.prompt[:200], add_special_tokens=False) if tok is not None else []
        return bool(req.prompt_ids) and req.prompt_ids[:1] != plain[:1]

    # ------------------------------------------------------------------------------------------------------
    def preflight(self, samples: Sequence[Any]) -> dict[str, str]:
        """Samples that cannot fit the context the server states: vLLM/SGLang/trtllm-serve's ``max_model_len`` in
        /v1/models, llama.cpp's ``n_ctx`` in /props (a llama.cpp server with context shift would otherwise drop
        half the context and answer). Then, before any sample, the greedy check (:meth:`check_greedy`)."""
        if samples and self.options.verify_greedy:
            self.check_greedy()
        limits = []
        if self.facts.max_model_len is not None and self.preset.name in ("vllm", "sglang", "trtllm"):
            # evalctx serve reports the trained window but runs past it on purpose, like the hf backend
            limits.append(("max_model_len", self.facts.max_model_len))
        n_ctx = self.identity().get("props.n_ctx")
        if isinstance(n_ctx, int) and n_ctx > 0:
            limits.append(("n_ctx (/props)", n_ctx))
        if not limits:
            return {}
        what, limit = min(limits, key=lambda x: x[1])
        return {s.id: f"context_length + max_new_tokens = {s.context_length + s.max_new_tokens} exceeds the "
                      f"server's {what} {limit}"
                for s in samples if s.context_length + s.max_new_tokens > limit}

    def check_greedy(self) -> None:
        """Send one probe prompt (a fixed list of unrelated words: a sampled continuation of it is almost never the
        same twice) three times with the run's settings; UsageError naming the likely cause unless all three
        answers are the same. Once per backend."""
        if self._greedy_checked:
            return
        self._greedy_checked = True
        probe = " ".join(_PROBE_WORDS) + " "
        ids = self.ctx.tokenizer.encode(probe, add_special_tokens=True) if self.ctx.tokenizer is not None else []
        req = GenerationRequest(sample_id="greedy-check", prompt_ids=ids, prompt=probe, max_new_tokens=24)
        path, body = self._body(req)
        body.pop("stream", None)
        body.pop("stream_options", None)
        answers = []
        for _ in range(3):
            try:
                answers.append(self._post(path, body).text)
            except (Fatal, Retryable) as exc:
                self._warn(f"the greedy check got no answer ({one_line(str(exc), 160)}); rows will show errors "
                           "if the server keeps failing")
                return
        if len(set(answers)) > 1:
            shown = " / ".join(one_line(repr(a), 40) for a in answers)
            raise RefusedBeforeWork(
                f"backend http: {self.base_url} does not decode greedily: one probe prompt sent 3 times with "
                f"temperature {self.options.temperature:g} got {len(set(answers))} different answers ({shown}), so "
                "every score would be a random draw. Likely: the served model's generation_config.json samples "
                "(do_sample: true) and the server takes it over temperature 0 (transformers serve "
                "--continuous-batching does), or the server ignores temperature; serve the model with greedy "
                "defaults, or pass --backend-opt verify_greedy=false to run anyway")

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

    def identity(self) -> dict[str, Any]:
        """The served model as the server states it: its /v1/models card (``id``, vLLM's ``root`` -- the checkpoint
        path -- and ``parent``, ``owned_by``, ``max_model_len``), llama.cpp's /props (``model_path``, ``n_ctx``),
        and the server version where it tells one. Absent fields are left out (None)."""
        self.info()  # fetches /v1/models and the version once
        card = _card(self._models_answer, self.model_name)
        out: dict[str, Any] = {f"models.{k}": card.get(k) for k in ("id", "root", "parent", "owned_by",
                                                                   "max_model_len")}
        out["server.version"] = self.facts.version
        if self.preset.name == "llamacpp" or self.facts.preset is None:
            if self._props is None:
                try:
                    self._props = self.client.get_json("/props", timeout=5.0)
                except (OSError, http.client.HTTPException, ValueError, Fatal):
                    self._props = {}
            props = self._props
            if isinstance(props, dict) and props:
                settings = props.get("default_generation_settings")
                out["props.model_path"] = props.get("model_path")
                out["props.n_ctx"] = settings.get("n_ctx") if isinstance(settings, dict) else props.get("n_ctx")
        return {k: v for k, v in out.items() if v is not None}

    def row_columns(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_name, "http_endpoint": self.options.endpoint,
                "http_send": self.options.send, "http_server": self.preset.name}
