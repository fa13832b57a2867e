"""The typed records that flow through evalctx: sample -> generation result -> score -> one flat row.

Units live in the names (``latency_s``, ``context_length`` in tokens, ``depth`` as a fraction). Missing values are
``None``, never sentinels; an error is a field of its own and never text handed to a scorer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1

FLAGS: dict[str, str] = {
    # name -> what it means for the row's score; reports, summary.csv (n_flagged) and the gate count them.
    "short_budget": "max_new_tokens is below the answer's length in tokens (meta_answer_tokens) and the output ran "
                    "to it: a whole answer could not fit, so a wrong score may be the budget's, not the model's",
    "beyond_trained_window": "prompt plus max_new_tokens exceeds the positions a rotary model's config states "
                             "(max_position_embeddings, RoPE-scaled as vLLM scales it): the score measures "
                             "extrapolation beyond the stated window",
    "unverified": "the server sent no token counts and verification was turned off (http verify_prompt=false): "
                  "the prompt length and the answer's completeness are unchecked",
    "host_timing": "latency_s/ttft_s were timed on the host (Python and transfer overhead included), not by the "
                   "engine's own timers",
    "kv_cache_reuse": "part of the prompt came from the KV cache (block reuse): TTFT is not a cold prefill",
}
"""Row flags: an ``ok`` row whose answer is whole but whose score needs a caveat. A row whose answer is known to
be cut or unverified is an ``error`` row instead, never a flagged ``ok``."""


@dataclass
class Sample:
    """One prompt of one task at one exact length and depth."""

    id: str
    """Stable hash of (task, task version, parameters, seed, tokenizer fingerprint, prompt mode)."""
    task: str
    """The suite entry's name (e.g. ``niah_single_2``); the task type's name (``passkey``, ``niah_single``) when
    the entry has none or the sample was built outside a suite."""
    context_length: int
    """Requested and asserted length of the whole prompt in tokens (BOS included when the tokenizer adds one)."""
    depth: float
    """Requested needle depth as a fraction of the haystack: 0.0 = start, 1.0 = end."""
    seed: int
    """Seed that, with the other fields, reproduces this sample exactly."""
    prompt: str
    """The whole rendered prompt text (raw completion text or the chat-templated text)."""
    prompt_ids: list[int]
    """Token ids of ``prompt`` as the tokenizer gives them; ``len(prompt_ids) == context_length``."""
    target: list[str]
    """Reference answers; scorers define how they are matched."""
    needle_token_index: int
    """Index in ``prompt_ids`` of the first token of the (first) needle."""
    max_new_tokens: int
    """Generation budget for this sample."""
    add_special_tokens: bool = True
    """Whether ``prompt_ids`` start with the tokenizer's leading special tokens (BOS; raw mode) or not (chat mode,
    where the template writes them). Specials a tokenizer appends (EOS) are never part of a prompt."""
    prompt_mode: str = "raw"
    """``raw`` (completion text ending in the answer prefix) or ``chat`` (the tokenizer's chat template)."""
    depth_actual: float | None = None
    """Where the needle really sits: needle token offset within the haystack / haystack tokens."""
    scorer: str = "string_match_all"
    """Name of the scorer in :mod:`evalctx.tasks.scoring`."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Task-specific extras (haystack name, key, template variant); flattened as ``meta_*`` columns."""
    special_spans: list[tuple[int, int]] = field(default_factory=list)
    """Character spans of ``prompt`` written by the chat template, where special-token strings are special tokens;
    everywhere else the prompt is text. ``prompt_ids == tokenizer.encode(prompt, add_special_tokens,
    special_spans)``. Empty in raw mode."""
    messages: list[dict[str, str]] | None = None
    """Chat mode: the user turn and the assistant prefill that ``prompt`` renders, for servers that apply their
    own chat template (http ``endpoint=chat``). Not written to JSON: it repeats the whole haystack."""
    task_type: str = ""
    """The registered task that built the sample (``passkey``, ``niah_single``, ...); defaults to ``task``."""
    task_options: str | None = None
    """The task's options with defaults filled in, a JSON object (set when built from a suite)."""

    def __post_init__(self) -> None:
        if not self.task_type:
            self.task_type = self.task

    def to_json(self, with_ids: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("messages")
        if not with_ids:
            d.pop("prompt_ids")
        return d


@dataclass
class GenerationRequest:
    """What a backend receives for one sample: token ids are authoritative, text is for servers that need it."""

    sample_id: str
    prompt_ids: list[int]
    prompt: str
    max_new_tokens: int
    add_special_tokens: bool = True
    prompt_mode: str = "raw"
    extra: dict[str, Any] = field(default_factory=dict)
    """Per-request options (e.g. a LoRA task uid)."""


@dataclass
class GenerationResult:
    """What a backend returns for one request, in the same order as the batch."""

    text: str | None
    """Generated text (None when ``error`` is set)."""
    n_prompt_tokens: int | None = None
    """Prompt length in tokens as the backend saw it (checked against the request)."""
    n_output_tokens: int | None = None
    """Generated tokens that make up ``text``. The end-of-sequence token (EOS, TensorRT-LLM's ``end_id``) that
    stopped generation is not counted: an answer cut at the budget has ``max_new_tokens``, one that stopped on EOS
    has fewer (its ``finish_reason`` is ``stop``). hf counts the tokens it kept before EOS, trtllm drops
    ``end_id``, fake counts ``text`` with the run's tokenizer; http takes the server's ``usage.completion_tokens``
    as reported, which a server that counts its stopping EOS makes one higher (docs/http.md). None: unknown."""
    latency_s: float | None = None
    """Wall time of this request, prefill and decode."""
    ttft_s: float | None = None
    """Time to first token (prefill time); None where it cannot be measured."""
    batch_size: int = 1
    finish_reason: str | None = None
    error: str | None = None
    """One-line error; the sample becomes an error row and is not scored."""
    peak_memory_bytes: int | None = None
    """Peak accelerator memory during this request, where the backend can tell."""
    n_cached_prompt_tokens: int | None = None
    """Prompt tokens served from a KV cache instead of computed (0 for a cold prefill; None where unknown)."""
    flags: list[str] = field(default_factory=list)
    """Names from :data:`FLAGS`: why an ``ok`` answer may not be what it looks like (kept, counted, reported)."""
    output_ids: list[int] | None = None
    """The generated token ids that make up ``text`` (the stopping end token left out), where the backend has
    them (hf); not stored in the results, used to compare answers token by token."""


@dataclass
class Score:
    value: float
    """In 0..1."""
    extracted: str | None
    """The answer the scorer read from the completion."""
    why: str = ""


@dataclass
class SampleRecord:
    """One flat row of results.parquet: one sample, one attempt."""

    run_id: str
    sample_id: str
    task: str
    context_length: int
    depth: float
    depth_actual: float | None
    seed: int
    prompt_mode: str
    needle_token_index: int
    target: list[str]
    """Reference answers, a list column (results.parquet ``list<string>``, a JSON list in the journal); empty for
    unsupported rows. Scorers take it as it is: rescoring a row is ``score(row.scorer, row.completion,
    row.target)``."""
    completion: str | None
    extracted: str | None
    score: float | None
    """None for error and unsupported rows: they are counted, never scored as wrong."""
    status: str
    """``ok``, ``error`` or ``unsupported``."""
    n_prompt_tokens: int | None
    n_output_tokens: int | None
    """See :attr:`GenerationResult.n_output_tokens` (EOS not counted)."""
    latency_s: float | None
    ttft_s: float | None
    prefill_tokens_per_s: float | None
    """Prompt tokens computed / ttft_s: ``context_length - n_cached_prompt_tokens`` (a warm row's TTFT timed only
    the suffix after its cached prefix)."""
    decode_tokens_per_s: float | None
    """Decode steps / (latency_s - ttft_s): every generated token after the first, the stopping EOS included."""
    batch_size: int | None
    finish_reason: str | None
    peak_memory_bytes: int | None
    error: str | None
    prompt_sha1: str
    scorer: str
    max_new_tokens: int
    replica: int = 0
    finished_at: float | None = None
    n_cached_prompt_tokens: int | None = None
    """Prompt tokens served from a KV cache (0 = cold prefill, so TTFT is a full prefill; None = unknown)."""
    flags: list[str] = field(default_factory=list)
    """Names from :data:`FLAGS`, empty for a clean row."""
    task_type: str | None = None
    """The registered task behind the row; ``task`` is the suite entry's name, which defaults to it."""
    task_options: str | None = None
    """The task's options with defaults filled in, a JSON object."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Backend/engine columns and task meta; flattened into the row when written."""

    def to_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        extra = row.pop("extra") or {}
        for k, v in extra.items():
            row.setdefault(k, v)
        return row


def record_fields() -> list[str]:
    """Column order of the fixed part of a results row."""
    return [f.name for f in dataclasses.fields(SampleRecord) if f.name != "extra"]
