"""Passkey retrieval: a random number hidden in filler text (TensorRT-LLM/InfiniteBench or Landmark wording).

Prompts, filler and scoring follow the upstream code (see the anchors): ``examples/infinitebench`` in TensorRT-LLM
(``eval_utils.create_prompt``, ``construct_synthetic_dataset.py``, ``compute_scores.first_int_match``) and
epfml/landmark-attention ``llama/run_test.py``. What differs is the length control: exact in tokens, never truncated.

``shape = "upstream"`` (template trtllm, noise haystack) builds instead the prompt InfiniteBench's
``construct_synthetic_dataset.build_passkey`` and TensorRT-LLM's ``eval_utils.create_prompt`` build, byte for byte:
whole noise lines, each ending in ``\n``, as many as upstream uses for the asked length (:func:`upstream_noise_lines`),
the needle line after ``round(depth x lines)`` of them. Its token count is whatever the tokenizer makes of it,
recorded, not forced: ``meta["prompt_tokens"]`` and each row's ``n_prompt_tokens``. The sample's ``context_length``
stays the asked length, the level upstream reports by, so the results table has one row per level.
Followed: NVIDIA/TensorRT-LLM ``examples/infinitebench/construct_synthetic_dataset.py`` (commit a17b14f6, levels up
to 1M) and ``eval_utils.py`` (commit f430a4b4); OpenBMB/InfiniteBench ``data/construct_synthetic_dataset.py``
(commits 220fd2e0 and 89b78553).
"""

from __future__ import annotations

import random
from typing import Any, ClassVar, Mapping

from evalctx.errors import UsageError
from evalctx.records import Sample
from evalctx.tasks.base import check_cell, take_shape
from evalctx.tasks.haystack import Haystack, get_haystack
from evalctx.tasks.haystack_task import Draw, HaystackTask
from evalctx.tasks.placement import SENTINEL, Needle, _token_containing, render_frame
from evalctx.models.tokenizer import Tokenizer

TRTLLM_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                      "I will quiz you about the important information.")
TRTLLM_INPUT = "What is the pass key?"
TRTLLM_ANSWER_PREFIX = "The pass key is"
LANDMARK_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                        "them. I will quiz you about the important information there.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
TEMPLATES = ("trtllm", "landmark")
UPSTREAM_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
"""construct_synthetic_dataset.py's ``noise``: one line, its newline included."""
UPSTREAM_ANSWER = "The pass key is {key}. Remember it. {key} is the pass key.\n"
"""construct_synthetic_dataset.py's ``answer`` (the needle line)."""
UPSTREAM_LEVELS = {8192: 326, 16384: 652, 32768: 1305, 65536: 2610, 131072: 5220, 262144: 10440, 524288: 20880,
                   1048576: 41760}
"""construct_synthetic_dataset.py's ``num_noise`` per ``--test_level`` 0..7 (its ``target_length`` comment)."""


def upstream_noise_lines(asked_length: int) -> int:
    """Noise lines upstream puts in a passkey prompt of ``asked_length`` tokens: its table at its eight levels (8K to
    1M), elsewhere its rate of 1305 lines per 32K tokens, rounded down (which reproduces every level of the table)."""
    return UPSTREAM_LEVELS.get(asked_length, asked_length * 1305 // 32768)


def upstream_context(lines: int, needle_line: int, key: str) -> str:
    """``noise * j + answer + noise * (N - j)`` with the key filled in: an InfiniteBench passkey ``context``."""
    return UPSTREAM_NOISE * needle_line + UPSTREAM_ANSWER.format(key=key) + UPSTREAM_NOISE * (lines - needle_line)


def upstream_prompt(lines: int, needle_line: int, key: str) -> str:
    """The raw prompt TensorRT-LLM's ``create_prompt(eg, "passkey", ...)`` renders for that context: instruction,
    blank line, context, blank line, question, blank line, answer prefix."""
    return (f"{TRTLLM_INSTRUCTION}\n\n{upstream_context(lines, needle_line, key)}\n\n{TRTLLM_INPUT}\n\n"
            f"{TRTLLM_ANSWER_PREFIX}")


class PasskeyTask(HaystackTask):
    """``passkey``: find a number hidden in a noise (or essay) haystack.

    ``template = "trtllm"`` (default): the TensorRT-LLM ``eval_long_context.py`` / InfiniteBench prompt, a
    ``key_digits``-digit key (leading zeros allowed, compared as a string), scored with ``first_int_match``,
    6 new tokens. ``template = "landmark"``: the original Landmark-attention prompt, its parts joined with
    newlines and its filler sentences with spaces, a key from 1 to 50000, ``landmark_int_match``, 10 new tokens.
    """

    name = "passkey"
    version = 1
    scorer = "first_int_match"
    default_max_new_tokens = 6
    description = "Passkey retrieval: a random number hidden in repeated noise text (TensorRT-LLM or Landmark wording)"
    defaults: ClassVar[dict[str, Any]] = {"template": "trtllm", "key_digits": 5, "haystack": "noise",
                                          "haystack_dir": None}

    def __init__(self, tokenizer: Tokenizer, options: Mapping[str, Any] | None = None,
                 prompt_mode: str = "raw") -> None:
        given = dict(options or {})
        self.shape = take_shape(self.name, given)
        super().__init__(tokenizer, given, prompt_mode)
        if self.shape == "upstream":
            if self.template != "trtllm" or self.options["haystack"] != "noise" or self.options["key_digits"] != 5:
                raise UsageError('task passkey: shape = "upstream" builds InfiniteBench\'s prompt: use template = '
                                 '"trtllm", haystack = "noise" and key_digits = 5 (the defaults)')
            self.options["shape"] = "upstream"
            self.explicit["shape"] = "upstream"
        if self.template == "landmark":
            if "key_digits" in self.explicit:
                raise UsageError('task passkey: key_digits applies to template = "trtllm" only (landmark keys are '
                                 "1..50000)")
            self.scorer = "landmark_int_match"  # type: ignore[misc]  # per-instance: depends on the template
            self.default_max_new_tokens = 10  # type: ignore[misc]

    def _haystack(self) -> Haystack:
        self.template = self.options["template"]
        if self.template not in TEMPLATES:
            raise UsageError(f"task passkey: unknown template {self.template!r}: choose trtllm or landmark")
        digits = self.options["key_digits"]
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 64:
            raise UsageError(f"task passkey: key_digits must be an integer 1..64, got {digits!r}")
        # Landmark's garbage is the noise sentence repeated with spaces; the others put one noise line per line.
        joiner = " " if self.template == "landmark" else "\n"
        return get_haystack(self.options["haystack"], self.options["haystack_dir"], joiner=joiner)

    def _draw(self, rng: random.Random, depth: float) -> Draw:
        if self.template == "landmark":
            key = str(rng.randint(1, 50000))
            # Landmark joins [instruction, garbage prefix, needle, garbage suffix, question] with "\n".
            user = f"{LANDMARK_INSTRUCTION}\n{SENTINEL}\n{TRTLLM_INPUT}"
            needle = Needle("\n" + NEEDLE.format(key=key), "\n")
            prefix = " " + TRTLLM_ANSWER_PREFIX
        else:
            key = "".join(rng.choice("0123456789") for _ in range(self.options["key_digits"]))
            # InfiniteBench: context = noise*j + needle line + noise*(N-j), every line ending in "\n".
            user = f"{TRTLLM_INSTRUCTION}\n\n{SENTINEL}\n\n{TRTLLM_INPUT}"
            needle = Needle(NEEDLE.format(key=key) + "\n")
            prefix = "\n\n" + TRTLLM_ANSWER_PREFIX
        return Draw(user_text=user, answer_prefix=prefix, needles=[needle], depths=[depth], targets=[key],
                    secrets=[key], meta={"template": self.template, "key": key})

    # ---------------------------------------------------------------------------------------- shape = "upstream"
    def make_sample(self, context_length: int, depth: float, seed: int, max_new_tokens: int | None = None) -> Sample:
        """Exact-length sample, or with ``shape = "upstream"`` InfiniteBench's prompt (:meth:`_upstream_sample`)."""
        if self.shape != "upstream":
            return super().make_sample(context_length, depth, seed, max_new_tokens)
        return self._upstream_sample(context_length, depth, seed, max_new_tokens)

    def min_length(self) -> int:
        """Upstream-shaped prompts are never cut to a length, so every asked length builds (one with no noise line
        is the needle line alone)."""
        return 1 if self.shape == "upstream" else super().min_length()

    def _upstream_sample(self, asked_length: int, depth: float, seed: int, max_new_tokens: int | None) -> Sample:
        """InfiniteBench's passkey prompt for ``asked_length``: :func:`upstream_noise_lines` whole noise lines, the
        needle line after ``round(depth x lines)`` of them, rendered as ``create_prompt`` renders it (raw mode:
        :func:`upstream_prompt` exactly). ``context_length`` is the prompt's own token count.

        Raises UsageError for a non-positive length or a depth outside 0..1.
        """
        depth = check_cell(asked_length, depth)
        mnt = self.default_budget() if max_new_tokens is None else max_new_tokens
        rng = self._rng(asked_length, depth, seed)
        draw = self._draw(rng, depth)  # the same key an exact-length sample of this cell hides
        key = draw.meta["key"]
        lines = upstream_noise_lines(asked_length)
        needle_line = round(depth * lines)
        frame = render_frame(self.tokenizer, self.prompt_mode, draw.user_text, draw.answer_prefix)
        context = upstream_context(lines, needle_line, key)
        text = frame.pre + context + frame.post
        shift = len(text) - len(frame.post)
        spans = frame.spans("pre") + [(shift + a, shift + b) for a, b in frame.spans("post")]
        ids, offsets = self.tokenizer.encode_with_offsets(text, frame.add_special_tokens, spans)
        needle_char = len(frame.pre) + len(UPSTREAM_NOISE) * needle_line
        t_body, t_needle = _token_containing(offsets, len(frame.pre)), _token_containing(offsets, needle_char)
        t_after = _token_containing(offsets, needle_char + len(UPSTREAM_ANSWER.format(key=key)))
        t_end = _token_containing(offsets, shift)
        noise_tokens = (t_end - t_body) - (t_after - t_needle)
        depth_actual = None if noise_tokens <= 0 else min(max((t_needle - t_body) / noise_tokens, 0.0), 1.0)
        messages = None
        if self.prompt_mode == "chat":
            messages = [{"role": "user", "content": draw.user_text.replace(SENTINEL, context)},
                        {"role": "assistant", "content": draw.answer_prefix.lstrip()}]
        meta = {"haystack": self.haystack.name, **draw.meta, "shape": "upstream", "asked_length": asked_length, "prompt_tokens": len(ids),
                "noise_lines": lines, "needle_line": needle_line, "answer_tokens": self._answer_tokens(frame, draw)}
        return Sample(id=self.sample_id(asked_length, depth, seed, mnt), task=self.name, context_length=asked_length,
                      depth=depth, seed=seed, prompt=text, prompt_ids=ids, target=draw.targets,
                      needle_token_index=t_needle, max_new_tokens=mnt, add_special_tokens=frame.add_special_tokens,
                      prompt_mode=self.prompt_mode, depth_actual=depth_actual, scorer=self.scorer, meta=meta,
                      special_spans=spans, messages=messages)
