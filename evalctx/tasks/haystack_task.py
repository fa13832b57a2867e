"""The shared machinery of haystack tasks: option checking, deterministic draws, redraws and Sample building.

Tasks (passkey, niah_*) describe what to hide (:class:`Draw`); :func:`evalctx.tasks.placement.assemble` puts it at
the exact length.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from evalctx.models import chat_identity
from evalctx.errors import LengthError, UsageError
from evalctx.records import Sample
from evalctx.tasks.base import Task, check_cell
from evalctx.tasks.haystack import Haystack
from evalctx.tasks.placement import (PROMPT_MODES, SENTINEL, Frame, Needle, assemble, minimum_length,
                                     render_frame)
from evalctx.models.tokenizer import Tokenizer

MIN_PROBES = 64
"""Seeded draws (each at depths 0 and 1) whose longest minimum and longest answer the task reports."""
_PROBED: dict[tuple, tuple[int, int]] = {}


@dataclass
class Draw:
    """What a task draws for one sample: the prompt around the haystack, its needles and the answers."""

    user_text: str
    """The user-turn text with :data:`SENTINEL` where the haystack goes."""
    answer_prefix: str
    needles: list[Needle]
    depths: list[float]
    targets: list[str]
    secrets: list[str]
    """Strings that must come from the needles only (keys and values): redrawn if the haystack holds one."""
    meta: dict[str, Any]


DEPTH_TOLERANCE = 0.10
"""A needle may sit this fraction of the haystack away from its asked depth (it goes at the nearest sentence
boundary) ..."""
DEPTH_TOLERANCE_TOKENS = 64
"""... or this many tokens, whichever is more (at short lengths one sentence is more than 10%); beyond, the sample
is refused. Within it, a cell whose needles sit more than :data:`evalctx.analysis.table.DEPTH_NOTE` away is noted
under the run's table."""


def depth_tolerance(haystack_tokens: int) -> float:
    """Tokens a needle may sit away from its asked depth in a haystack of ``haystack_tokens`` tokens."""
    return max(DEPTH_TOLERANCE * haystack_tokens, DEPTH_TOLERANCE_TOKENS)


def sample_id(task: str, version: int, options: Mapping[str, Any], length: int, depth: float, seed: int,
              tokenizer_fp: str, prompt_mode: str, max_new_tokens: int, chat_date: str | None = None) -> str:
    """Stable sha1 (first 16 hex digits) over everything that determines a sample. ``chat_date``: the day a chat
    template that writes the date was rendered for (None for every other prompt, whose ids it leaves as they
    were)."""
    parts: list[Any] = [task, version, sorted(options.items()), length, depth, seed, tokenizer_fp, prompt_mode,
                        max_new_tokens]
    if chat_date is not None:
        parts.append(chat_date)
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


class HaystackTask(Task):
    """A task that hides needles in a haystack: option checking, deterministic draws, redraws, Sample building.

    Subclasses set ``defaults`` (every option they accept) and implement ``_haystack`` and ``_draw``.
    """

    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, tokenizer: Tokenizer, options: Mapping[str, Any] | None = None,
                 prompt_mode: str = "raw") -> None:
        super().__init__(tokenizer, options, prompt_mode)
        if prompt_mode not in PROMPT_MODES:
            raise UsageError(f"unknown prompt_mode {prompt_mode!r}: choose raw or chat")
        unknown = sorted(set(self.options) - set(self.defaults))
        if unknown:
            raise UsageError(f"task {self.name}: unknown option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(self.defaults)) or 'none (it takes no options)'}")
        self.explicit = dict(self.options)
        self.options = {**self.defaults, **self.options}
        if prompt_mode == "chat" and not tokenizer.has_chat_template():
            raise UsageError(f"tokenizer {tokenizer.name} has no chat template: use prompt_mode = \"raw\"")
        self.haystack = self._haystack()

    def _haystack(self) -> Haystack:
        raise NotImplementedError

    def _draw(self, rng: random.Random, depth: float) -> Draw:
        raise NotImplementedError

    def id_options(self) -> dict[str, Any]:
        """Options as they enter the sample id: the haystack's content hash stands for its folder path."""
        opts = {k: v for k, v in self.options.items() if k != "haystack_dir"}
        opts["haystack_sha"] = self.haystack.fingerprint
        return opts

    def sample_id(self, context_length: int, depth: float, seed: int, max_new_tokens: int | None = None) -> str:
        """The id :meth:`make_sample` gives this cell, known without building the prompt (a suite's spec id)."""
        mnt = self.default_budget() if max_new_tokens is None else max_new_tokens
        day = chat_identity.date_key(self.tokenizer) if self.prompt_mode == "chat" else None
        return sample_id(self.name, self.version, self.id_options(), context_length, float(depth), seed,
                         self.tokenizer.fingerprint(), self.prompt_mode, mnt, day)

    def _rng(self, context_length: int, depth: float, seed: int) -> random.Random:
        # Per cell, independent of the tokenizer: the same seed hides the same key for every model compared.
        h = hashlib.sha1(f"{self.name}|{seed}|{context_length}|{depth!r}".encode()).digest()
        return random.Random(int.from_bytes(h[:8], "big"))

    def _clean(self, text: str, draw: Draw) -> bool:
        """Each needle occurs once, and each answer occurs only inside the needles."""
        if any(text.count(n.text.strip()) != 1 for n in draw.needles):
            return False
        return all(text.count(t) == sum(n.text.count(t) for n in draw.needles) for t in draw.targets)

    def _frame(self, draw: Draw) -> Frame:
        return render_frame(self.tokenizer, self.prompt_mode, draw.user_text, draw.answer_prefix)

    def make_sample(self, context_length: int, depth: float, seed: int, max_new_tokens: int | None = None) -> Sample:
        depth = check_cell(context_length, depth)
        mnt = self.default_budget() if max_new_tokens is None else max_new_tokens
        rng = self._rng(context_length, depth, seed)
        for _ in range(100):
            draw = self._draw(rng, depth)
            if any(self.haystack.contains(s) for s in draw.secrets):
                continue  # e.g. a short landmark key that an essay happens to contain
            frame = self._frame(draw)
            asm = assemble(self.tokenizer, frame, self.haystack, draw.needles, draw.depths, context_length,
                           label=self.name)
            if self._clean(asm.text, draw):
                break
        else:
            raise UsageError(f"task {self.name}: could not draw a key that the haystack does not already contain")
        self._check_depth(asm, draw.depths[0], context_length)
        sid = self.sample_id(context_length, depth, seed, mnt)
        meta = {"haystack": self.haystack.name, **draw.meta, "answer_tokens": self._answer_tokens(frame, draw)}
        if len(asm.needle_token_indices) > 1:
            meta["needle_token_indices"] = asm.needle_token_indices
        messages = None
        if self.prompt_mode == "chat":
            # The text between the frame's two halves is the haystack with its needles: put it back into the
            # user turn, so a server that templates messages itself renders this very prompt.
            context = asm.text[len(frame.pre):len(asm.text) - len(frame.post)]
            messages = [{"role": "user", "content": draw.user_text.replace(SENTINEL, context)},
                        {"role": "assistant", "content": draw.answer_prefix.lstrip()}]
        return Sample(id=sid, task=self.name, context_length=context_length, depth=depth, seed=seed,
                      prompt=asm.text, prompt_ids=asm.ids, target=draw.targets,
                      needle_token_index=asm.needle_token_index, max_new_tokens=mnt,
                      add_special_tokens=frame.add_special_tokens, prompt_mode=self.prompt_mode,
                      depth_actual=asm.depth_actual, scorer=self.scorer, meta=meta,
                      special_spans=list(asm.special_spans or []), messages=messages)

    def _check_depth(self, asm: Any, depth: float, context_length: int) -> None:
        """LengthError (the sample becomes an unsupported row, with this reason) when the first needle sits further
        from its asked depth than :func:`depth_tolerance` allows: a haystack whose sentence boundaries are far apart
        (a script whose sentence ends evalctx does not know, a text without line breaks) would otherwise put every
        needle at one place and report it under the asked depth's column."""
        if asm.depth_actual is None or depth >= 1.0:
            return
        off = abs(asm.depth_actual - depth) * asm.haystack_tokens
        allowed = depth_tolerance(asm.haystack_tokens)
        if off > allowed:
            raise LengthError(
                f"{self.name} at {context_length} tokens: the needle for depth {depth:g} could only go at depth "
                f"{asm.depth_actual:.2f} ({off:.0f} tokens away, more than the {allowed:.0f} allowed): haystack "
                f"{self.haystack.name} has no sentence boundary nearer; use a haystack whose sentences end in "
                f"punctuation evalctx knows (. ? ! 。！？ । ؟ ...) or line breaks")

    def _answer_tokens(self, frame: Frame, draw: Draw) -> int:
        """Tokens of the right answer as the model writes it after the prompt: a space, then the targets joined by
        ", " (what the scorers look for), counted after the answer prefix with this tokenizer."""
        spans = frame.spans("post")
        encode = self.tokenizer.encode
        answer = " " + ", ".join(draw.targets)
        return len(encode(frame.post + answer, False, spans)) - len(encode(frame.post, False, spans))

    def _probe(self) -> tuple[int, int]:
        """(longest minimum length, longest answer in tokens) over :data:`MIN_PROBES` seeded draws."""
        key = (self.name, self.version, json.dumps(sorted(self.id_options().items()), default=str),
               self.tokenizer.fingerprint(), self.prompt_mode)
        if key not in _PROBED:
            lo = answer = 0
            for seed in range(MIN_PROBES):
                for depth in (0.0, 1.0):
                    draw = self._draw(self._rng(0, depth, seed), depth)
                    frame = self._frame(draw)
                    lo = max(lo, minimum_length(self.tokenizer, frame, self.haystack, draw.needles, draw.depths))
                    answer = max(answer, self._answer_tokens(frame, draw))
            _PROBED[key] = (lo, answer)
        return _PROBED[key]

    def min_length(self) -> int:
        """The longest of the minimums of :data:`MIN_PROBES` seeded draws, at depths 0 and 1.

        Keys, values and the question that names them differ in tokens from draw to draw (a 7-digit value, an
        adjective-noun key), so one draw's minimum is not the task's: a length that fits one key is too short for
        another. A draw beyond every probed one is still possible; its sample becomes an unsupported row (see
        :meth:`evalctx.run.sampling.SampleBuilder.unbuildable`), never a failed run.
        """
        return self._probe()[0]

    def answer_tokens(self) -> int:
        """The longest answer of :data:`MIN_PROBES` seeded draws in tokens (``meta["answer_tokens"]`` has each
        sample's own; a longer one than every probe is flagged ``short_budget`` if its output runs out)."""
        return self._probe()[1]
