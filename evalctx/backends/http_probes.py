"""What the HTTP backend asks the server about itself, apart from the samples: the base URL's form, the served
model (/v1/models), which server it is (/openapi.json, :mod:`evalctx.backends.http_servers`), the model and context
it states (/v1/models, llama.cpp's /props), the samples that cannot fit that context, and the greedy check (one
probe prompt sent three times must get one answer).

:class:`ServerProbes` is a mixin of :class:`evalctx.backends.openai_http.HTTPBackend`; its methods use the
backend's client, options, preset and facts.
"""

from __future__ import annotations

import http.client
import urllib.parse
from typing import Any, Sequence

from evalctx.backends.http_client import Client, Fatal, Retryable, one_line
from evalctx.backends.http_servers import PRESETS, ServerFacts, detect
from evalctx.errors import RefusedBeforeWork, UsageError
from evalctx.records import GenerationRequest


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


class ServerProbes:
    """The HTTP backend's questions to the server about itself (see the module doc)."""

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
