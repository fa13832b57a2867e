"""From a suite to the list of sample specs: cheap to enumerate (no prompt is built), stable ids for resume.

Prompts are built only where a spec is run (on the replica that owns it), so a 1M-token suite is sharded before
any tokenization and a resumed run builds nothing it already has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from evalctx.config import Suite, TaskSpec, check_entry_names
from evalctx.errors import LengthError, UsageError
from evalctx.records import Sample
from evalctx.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class SampleSpec:
    """Everything that determines one sample; ``id`` is its stable hash."""

    id: str
    task: str
    """The suite entry's name (the ``task`` column); the task type's name unless the entry names itself."""
    task_index: int
    """Index of the [[tasks]] table in the suite (two tables may use the same task with other options)."""
    context_length: int
    depth: float
    seed: int
    max_new_tokens: int
    prompt_mode: str
    task_type: str = ""
    """The registered task that builds the sample (``passkey``, ``niah_single``, ...)."""
    task_options: str = "{}"
    """The task's options with defaults filled in, as a JSON object (the ``task_options`` column)."""


def derive_seed(base: int, *parts: Any) -> int:
    """A per-sample seed that changes with every coordinate, so cells never share keys by accident."""
    h = hashlib.sha1(json.dumps([base, *parts], default=str).encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def _task_instance(spec: TaskSpec, tokenizer: Tokenizer) -> Any:
    from evalctx.tasks import get_task

    return get_task(spec.task)(tokenizer, spec.options, spec.prompt_mode)


def enumerate_specs(suite: Suite, tokenizer: Tokenizer) -> list[SampleSpec]:
    return SampleBuilder(suite, tokenizer).specs()


class SampleBuilder:
    """Builds the samples of specs on demand, with one task instance (and its haystack caches) per suite table."""

    NEAR_MINIMUM = 32
    """Specs shorter than their task's ``min_length() + NEAR_MINIMUM`` are built up front by :meth:`unbuildable`."""

    def __init__(self, suite: Suite, tokenizer: Tokenizer) -> None:
        check_entry_names(suite.tasks, suite.path or suite.name)  # also for suites built in code
        self.suite = suite
        self.tokenizer = tokenizer
        self._tasks: dict[int, Any] = {}
        self._built: dict[str, Sample] = {}
        self._counts: dict[str, int] = {}  # prompt tokens of upstream-shaped specs (prompt_tokens)

    def task(self, index: int) -> Any:
        if index not in self._tasks:
            self._tasks[index] = _task_instance(self.suite.tasks[index], self.tokenizer)
        return self._tasks[index]

    def specs(self) -> list[SampleSpec]:
        """Every sample of the suite as a spec, with the same task instances that will build them."""
        specs: list[SampleSpec] = []
        seen: dict[str, str] = {}
        for ti, ts in enumerate(self.suite.tasks):
            task = self.task(ti)
            mnt = ts.max_new_tokens or task.default_budget()
            recorded = dict(task.options)
            if getattr(task, "haystack", None) is not None:  # the filler's content, whatever folder it came from
                recorded["haystack_sha"] = task.haystack.fingerprint
            options = json.dumps(recorded, sort_keys=True, default=str)
            for length in ts.lengths:
                for depth in map(float, ts.depths):  # 1 and 1.0 are the same cell (same seed, same id)
                    for k in range(ts.samples):
                        # Seeded by the entry's name (the task's unless named): two named variants of one task
                        # draw their own keys, and suites without names keep their seeds and ids.
                        seed = derive_seed(ts.seed, ts.name, length, round(depth, 6), k)
                        # The task's own id (options with defaults filled in, the haystack's content hash): the
                        # same id its Sample will carry, known before any prompt is built.
                        sid = task.sample_id(length, depth, seed, mnt)
                        if sid in seen:  # the same cell listed twice under one name is run once
                            if seen[sid] != ts.name:
                                raise UsageError(f"entries {seen[sid]!r} and {ts.name!r} build the same sample "
                                                 f"{sid}: give them other options or seeds")
                            continue
                        seen[sid] = ts.name
                        specs.append(SampleSpec(sid, ts.name, ti, length, depth, seed, mnt, ts.prompt_mode,
                                                ts.task, options))
        return specs

    def check_min_lengths(self) -> None:
        """Raise LengthError naming the task and its minimum when a suite length is below it (``run`` and
        ``generate`` refuse the same suites)."""
        for i, ts in enumerate(self.suite.tasks):
            need = self.task(i).min_length()
            short = [n for n in ts.lengths if n < need]
            if short:
                raise LengthError(f"task {ts.name}: length(s) {short} are below the {need} tokens its template and "
                                  f"needles need with this tokenizer (for the longest keys); use lengths >= {need}")

    def budget_warnings(self) -> list[str]:
        """One line per suite table whose hand-set max_new_tokens cannot hold its task's answers."""
        out = []
        for i, ts in enumerate(self.suite.tasks):
            need = self.task(i).answer_tokens()
            if ts.max_new_tokens is not None and ts.max_new_tokens < need:
                out.append(f"task {ts.name}: max_new_tokens {ts.max_new_tokens} cannot hold its answers (up to "
                           f"{need} tokens with this tokenizer); rows whose output runs to the limit are flagged "
                           f"short_budget: raise max_new_tokens to >= {need} or leave it unset")
        return out

    def prompt_tokens(self, spec: SampleSpec) -> int:
        """Tokens of ``spec``'s prompt: its ``context_length``, except for an upstream-shaped task (``shape =
        "upstream"``: whole upstream lines, the count recorded, not forced), whose prompt is built once to count
        it. What the engine limits, memory and sizing must be checked against."""
        if getattr(self.task(spec.task_index), "shape", "exact") != "upstream":
            return spec.context_length
        if spec.id not in self._counts:
            self._counts[spec.id] = len(self._make(spec).prompt_ids)
        return self._counts[spec.id]

    def counted(self, specs: list[SampleSpec]) -> list[SampleSpec]:
        """``specs`` with each context_length replaced by :meth:`prompt_tokens` (for backend preflights)."""
        return [s if (n := self.prompt_tokens(s)) == s.context_length else dataclasses.replace(s, context_length=n)
                for s in specs]

    def unbuildable(self, specs: list[SampleSpec]) -> dict[str, str]:
        """``{spec id: reason}`` for the specs near their task's minimum length that cannot be built.

        Which key a sample hides decides how short its prompt can be, and right above a draw's minimum a haystack
        of one or two tokens cannot always be cut; both are found here, before any GPU work, by building the
        (short, cheap) prompts near the minimum. Those that build are kept for :meth:`build`.
        """
        out: dict[str, str] = {}
        for spec in specs:
            if spec.context_length >= self.task(spec.task_index).min_length() + self.NEAR_MINIMUM:
                continue
            try:
                self._built[spec.id] = self.build(spec)
            except LengthError as exc:
                out[spec.id] = str(exc)
        return out

    def _make(self, spec: SampleSpec) -> Sample:
        return self.task(spec.task_index).make_sample(spec.context_length, spec.depth, spec.seed, spec.max_new_tokens)

    def build(self, spec: SampleSpec) -> Sample:
        """The sample of ``spec``; raises LengthError when no prompt of exactly its length exists."""
        if spec.id in self._built:
            return self._built.pop(spec.id)
        sample = self._make(spec)
        if sample.id != spec.id:  # the resume key: both come from the task's sample_id, so this is a bug
            raise AssertionError(f"sample {spec.id}: built with id {sample.id}")
        sample = dataclasses.replace(sample, task=spec.task, task_type=spec.task_type, task_options=spec.task_options)
        upstream = sample.meta.get("shape") == "upstream"  # upstream-shaped: the count is recorded, not forced
        expected = sample.meta.get("prompt_tokens") if upstream else spec.context_length
        if len(sample.prompt_ids) != expected:
            # The generators assert this too; a violation here is a bug, never a silently shorter prompt.
            raise AssertionError(f"sample {spec.id}: {len(sample.prompt_ids)} tokens != {expected}")
        return sample
