"""The task contract: a generator of token-exact samples, deterministic from (task, options, seed, tokenizer)."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from evalctx.errors import UsageError
from evalctx.models.tokenizer import Tokenizer
from evalctx.records import Sample


SHAPES = ("exact", "upstream")
"""Prompt shapes of the tasks that can build upstream's prompts: exact token counts, or upstream's whole lines."""


def take_shape(task: str, options: dict[str, Any]) -> str:
    """Pop the ``shape`` option from ``options`` (default "exact"); UsageError naming the choices otherwise. It joins
    a task's options only where it is not the default, so exact-length runs keep the options, sample ids and
    task_options they had before it existed (resume and compare depend on them)."""
    shape = options.pop("shape", "exact")
    if shape not in SHAPES:
        raise UsageError(f"task {task}: unknown shape {shape!r}: choose exact (prompts of exactly the asked token "
                         "count) or upstream (InfiniteBench's prompts byte for byte)")
    return shape


def check_cell(context_length: Any, depth: Any) -> float:
    """The depth of a (context_length, depth) cell as a float (a TOML ``1`` and ``1.0`` are the same cell, and the
    same sample id); UsageError for a length that is not a positive integer or a depth outside 0..1."""
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise UsageError(f"context_length must be a positive integer, got {context_length!r}")
    if not 0.0 <= depth <= 1.0:
        raise UsageError(f"depth {depth!r} is outside 0..1: depths are fractions 0..1, not percent")
    return float(depth)


class Task:
    """Subclasses set the class attributes and implement ``make_sample``.

    ``options`` are the task's own suite options (``[tasks.options]``); unknown keys must raise UsageError.
    """

    name: ClassVar[str] = "base"
    version: ClassVar[int] = 1
    """Bump when the prompt or generation changes: it is part of every sample id."""
    scorer: ClassVar[str] = "string_match_all"
    default_max_new_tokens: ClassVar[int] = 32
    """The upstream generation budget; :meth:`default_budget` raises it where this tokenizer's answers are longer."""
    description: ClassVar[str] = ""

    def __init__(self, tokenizer: Tokenizer, options: Mapping[str, Any] | None = None,
                 prompt_mode: str = "raw") -> None:
        self.tokenizer = tokenizer
        self.options = dict(options or {})
        self.prompt_mode = prompt_mode

    def make_sample(self, context_length: int, depth: float, seed: int, max_new_tokens: int | None = None) -> Sample:
        """One sample whose prompt is exactly ``context_length`` tokens; raises LengthError if it cannot be."""
        raise NotImplementedError

    def min_length(self) -> int:
        """The shortest context_length this task can build with this tokenizer and mode."""
        raise NotImplementedError

    def answer_tokens(self) -> int:
        """The longest right answer in tokens with this tokenizer, as the model writes it after the answer prefix
        (0 when the task cannot tell)."""
        return 0

    def default_budget(self) -> int:
        """max_new_tokens when a suite sets none: the upstream default, or the longest answer when that is longer.

        An 8-digit passkey is 9 tokens (a space and one token per digit) with a digit-per-token tokenizer: the
        upstream 6 would cut every answer to 5 digits and score 0.
        """
        return max(self.default_max_new_tokens, self.answer_tokens())
