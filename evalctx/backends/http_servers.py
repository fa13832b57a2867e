"""What each OpenAI-compatible server needs to decode greedily and to get evalctx's exact prompt, and how to tell
which server answers (``server=auto``).

Temperature 0 alone is not greedy: a repetition penalty changes the logits before the argmax, and servers take
their defaults from different places (vLLM and SGLang from the model's ``generation_config.json``, llama.cpp from
its own 1.1). Each preset sends the fields that server honours, at their neutral values. Facts per server:

* vllm: ``repetition_penalty``, ``frequency_penalty``, ``presence_penalty`` (vLLM's SamplingParams, OpenAI
  protocol extensions); takes token ids as ``prompt``; honours ``add_special_tokens``; usage in streams with
  ``stream_options.include_usage``; ``/v1/models`` says ``owned_by: vllm`` and ``max_model_len``.
* sglang: the same fields (SGLang's sampling params); ``owned_by: sglang``.
* trtllm: trtllm-serve's CompletionRequest fields ``repetition_penalty``, ``frequency_penalty``,
  ``presence_penalty`` and ``top_k`` (1: TensorRT-LLM's greedy); ``owned_by: tensorrt_llm``.
* llamacpp: llama-cpp-python's server (``llama_cpp.server``, seen at 0.3.36) and llama.cpp's ``llama-server``:
  ``repeat_penalty`` (default 1.1; it ignores ``repetition_penalty``), ``frequency_penalty``, ``presence_penalty``.
  llama-cpp-python takes the prompt as text only (a list of ids is an HTTP 500), ignores ``add_special_tokens``
  (it always adds the BOS and parses special-token text), ``continue_final_message`` and
  ``stream_options.include_usage``, serves one request at a time and cuts a running stream when another request
  arrives (``interrupt_requests``). Its ``/openapi.json`` title names it; ``llama-server`` says
  ``owned_by: llamacpp``.
* transformers: ``transformers serve`` (transformers 5.25, measured): it takes only fields of OpenAI's schema
  (``add_special_tokens``, ``repetition_penalty``, ``continue_final_message`` get HTTP 422; ``frequency_penalty: 0``
  turns a penalty from the model's generation config off), a prompt as text only (ids: HTTP 400), adds the BOS
  to a text prompt, counts the EOS in ``completion_tokens`` and says ``finish_reason: length`` when answer plus EOS
  exactly fill ``max_tokens``. Its ``/openapi.json`` lists ``/load_model`` and ``/v1/systemone``, which name it.
  With ``--continuous-batching`` it samples when the model's generation config says ``do_sample: true`` (the
  greedy check catches that).
* evalctx: ``evalctx serve`` (greedy only; it accepts the neutral values of the vLLM fields).
* openai: any other server: the OpenAI API's own ``frequency_penalty`` and ``presence_penalty`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServerPreset:
    """How evalctx talks to one kind of server."""

    name: str
    neutral: dict[str, Any] = field(default_factory=dict)
    """Sampling fields sent with ``temperature: 0`` so that decoding is greedy (a user's extra_body wins)."""
    takes_ids: bool = True
    """Accepts a list of token ids as the completions ``prompt`` (``send=ids``)."""
    honours_add_special_tokens: bool = True
    """Honours the ``add_special_tokens`` field; where not, a prompt that holds its BOS as text is sent without
    that text and the server adds the BOS itself."""
    serial: bool = False
    """Runs one request at a time and cuts a running stream when another arrives: one request in flight."""
    counts_eos: bool = False
    """``completion_tokens`` counts the end token that stopped the answer (evalctx's n_output_tokens does not)."""
    continues_messages: bool = True
    """Takes ``continue_final_message``/``add_generation_prompt`` (an answer prefix continued in chat)."""


_VLLM_FIELDS = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}

PRESETS: dict[str, ServerPreset] = {
    "vllm": ServerPreset("vllm", dict(_VLLM_FIELDS)),
    "sglang": ServerPreset("sglang", dict(_VLLM_FIELDS)),
    "trtllm": ServerPreset("trtllm", {**_VLLM_FIELDS, "top_k": 1}),
    "llamacpp": ServerPreset("llamacpp", {"repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0},
                             takes_ids=False, honours_add_special_tokens=False, serial=True),
    "evalctx": ServerPreset("evalctx", dict(_VLLM_FIELDS)),
    "transformers": ServerPreset("transformers", {"frequency_penalty": 0.0, "presence_penalty": 0.0},
                                 takes_ids=False, honours_add_special_tokens=False, counts_eos=True,
                                 continues_messages=False),
    "openai": ServerPreset("openai", {"frequency_penalty": 0.0, "presence_penalty": 0.0}),
}
"""Presets by name; ``server=auto`` picks one with :func:`detect`."""

_OWNED_BY = {"vllm": "vllm", "sglang": "sglang", "tensorrt_llm": "trtllm", "llamacpp": "llamacpp",
             "evalctx": "evalctx"}


@dataclass
class ServerFacts:
    """What the server says about itself (``/v1/models``, ``/openapi.json``), for the preset and the manifest."""

    preset: str | None
    """The preset these facts point to; None when the server is not recognised."""
    how: str
    """How it was recognised, for the manifest and the warning (e.g. ``owned_by 'vllm'``)."""
    version: str | None = None
    max_model_len: int | None = None


def detect(models: Any, openapi: Any) -> ServerFacts:
    """Recognise the server from its ``/v1/models`` answer and, failing that, its ``/openapi.json`` (either may be
    None when the server did not answer)."""
    card = {}
    if isinstance(models, dict) and isinstance(models.get("data"), list) and models["data"]:
        first = models["data"][0]
        card = first if isinstance(first, dict) else {}
    mml = card.get("max_model_len")
    max_model_len = mml if isinstance(mml, int) and not isinstance(mml, bool) and mml > 0 else None
    info = openapi.get("info") if isinstance(openapi, dict) else None
    title = str(info.get("title") or "") if isinstance(info, dict) else ""
    version = str(info["version"]) if isinstance(info, dict) and info.get("version") else None
    owned_by = str(card.get("owned_by") or "")
    if owned_by in _OWNED_BY:
        return ServerFacts(_OWNED_BY[owned_by], f"owned_by {owned_by!r} in /v1/models",
                           version if title and title != "FastAPI" else None, max_model_len)
    if "llama.cpp" in title:
        return ServerFacts("llamacpp", f"/openapi.json title {title!r}", version, max_model_len)
    paths = openapi.get("paths") if isinstance(openapi, dict) else None
    if isinstance(paths, dict) and {"/load_model", "/v1/systemone"} <= set(paths):
        return ServerFacts("transformers", "/openapi.json lists /load_model and /v1/systemone", None, max_model_len)
    return ServerFacts(None, f"owned_by {owned_by!r}" + (f", /openapi.json title {title!r}" if title else ""),
                       None, max_model_len)
