"""Prompt logs (``evalctx run --log-samples``) and the excerpts ``evalctx show`` prints: head, needle region, tail.

results.parquet keeps a prompt hash, never the prompt: a 1M-token prompt is megabytes of text. With
``--log-samples`` each replica leader also appends, per batch, one JSON line per sample to
``prompts/replica-R.jsonl``:

- ``excerpt`` (the default): the whole prompt up to :data:`WHOLE_UP_TO` characters; a longer one as its first and
  last :data:`EXCERPT_CHARS` characters and that many around each needle. Enough to see what the model was asked
  and what surrounded the needle, at a few kB per sample whatever the length.
- ``full``: every prompt whole (lm-evaluation-harness's ``--log_samples``); as large as ``evalctx generate``.

A line is ``{"sample_id", "prompt_chars", "needle_chars", "pieces": [[start_char, text], ...]}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from evalctx.records import Sample
from evalctx.results.journal import read_jsonl
from evalctx.results.rundir import PROMPTS_DIR

LOG_MODES = ("excerpt", "full")
EXCERPT_CHARS = 1000
WHOLE_UP_TO = 8 * EXCERPT_CHARS


def needle_chars(sample: Sample, tokenizer: Any = None) -> list[int]:
    """Character offsets in ``sample.prompt`` of the needles: where each target first occurs (the tasks draw keys
    the haystack does not contain), else where the tokenizer puts ``needle_token_index``."""
    found = sorted({i for t in sample.target if t and (i := sample.prompt.find(t)) >= 0})
    if found or tokenizer is None or sample.needle_token_index < 0:
        return found
    _, offsets = tokenizer.encode_with_offsets(sample.prompt, add_special_tokens=sample.add_special_tokens)
    return [offsets[sample.needle_token_index][0]] if sample.needle_token_index < len(offsets) else []


def pieces(prompt: str, needles: Sequence[int], chars: int = EXCERPT_CHARS) -> list[tuple[int, str]]:
    """Head, a window around each needle and tail, overlapping windows merged, in prompt order."""
    spans = [(0, chars), (len(prompt) - chars, len(prompt))]
    spans += [(c - chars // 2, c + chars // 2) for c in needles]
    merged: list[list[int]] = []
    for a, b in sorted((max(0, a), min(len(prompt), b)) for a, b in spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, prompt[a:b]) for a, b in merged]


def prompt_record(sample: Sample, mode: str, tokenizer: Any = None) -> dict[str, Any]:
    """One log line for ``sample`` in ``mode`` (``excerpt`` or ``full``)."""
    needles = needle_chars(sample, tokenizer)
    whole = mode == "full" or len(sample.prompt) <= WHOLE_UP_TO
    return {"sample_id": sample.id, "prompt_chars": len(sample.prompt), "needle_chars": needles,
            "pieces": [(0, sample.prompt)] if whole else pieces(sample.prompt, needles)}


def _well_formed(r: dict[str, Any]) -> bool:
    """A line of the shape :func:`prompt_record` writes (one edited by hand or by another program is not)."""
    pieces_ = r.get("pieces")
    return (isinstance(r.get("prompt_chars"), int) and isinstance(r.get("needle_chars"), list)
            and all(isinstance(c, int) for c in r["needle_chars"]) and isinstance(pieces_, list)
            and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and isinstance(p[1], str)
                    for p in pieces_))


def read_prompts(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Logged prompts by sample id (the last line wins: a retried sample logs its prompt again). A line of another
    shape is left out: ``show`` then builds that prompt again from the manifest, as for a run without a log."""
    return {r["sample_id"]: r for r in read_jsonl(Path(run_dir) / PROMPTS_DIR) if _well_formed(r)}


def render(record: dict[str, Any], full: bool = False) -> str:
    """The prompt as text, with a marker line where characters are left out: head, needle region(s) and tail of a
    long prompt, or (``full``) all that the record holds."""
    total = int(record["prompt_chars"])
    have = [(int(a), str(t)) for a, t in record["pieces"]]
    if not full and len(have) == 1 and total > WHOLE_UP_TO:  # a whole long prompt: cut it as the log would
        have = pieces(have[0][1], record["needle_chars"])
    out: list[str] = []
    pos = 0
    for start, text in have:
        if start > pos:
            out.append(f"\n[... {start - pos:,} characters not shown ...]\n")
        out.append(text)
        pos = start + len(text)
    if pos < total:
        out.append(f"\n[... {total - pos:,} characters not shown ...]")
    return "".join(out)
