"""Passkey retrieval: a random number hidden in filler text (TensorRT-LLM/InfiniteBench or Landmark wording).

Prompts, filler and scoring follow the upstream code (see the anchors): ``examples/infinitebench`` in TensorRT-LLM
(``eval_utils.create_prompt``, ``construct_synthetic_dataset.py``, ``compute_scores.first_int_match``) and
epfml/landmark-attention ``llama/run_test.py``. What differs is the length control: exact in tokens, never truncated.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar, Mapping

from evalctx.errors import UsageError
from evalctx.tasks.haystack import Haystack, get_haystack
from evalctx.tasks.haystack_task import Draw, HaystackTask
from evalctx.tasks.placement import SENTINEL, Needle
from evalctx.tokenizer import Tokenizer

TRTLLM_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                      "I will quiz you about the important information.")
TRTLLM_INPUT = "What is the pass key?"
TRTLLM_ANSWER_PREFIX = "The pass key is"
LANDMARK_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                        "them. I will quiz you about the important information there.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
TEMPLATES = ("trtllm", "landmark")


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
        super().__init__(tokenizer, options, prompt_mode)
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
