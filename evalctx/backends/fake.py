"""A model that ships in the package: answers read from the prompt (oracle), constants, scripts and faults.

It exercises every path of the runner without a GPU: scoring, error rows, resume after a kill, MPI layouts, and
regression gates (``miss_beyond`` makes the oracle miss needles in long prompts).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from evalctx.backends.base import Backend, BackendContext
from evalctx.errors import UsageError
from evalctx.records import GenerationRequest, GenerationResult

_PASSKEY = re.compile(r"[Tt]he pass key is (\d+)\. Remember it")
_NIAH_QUERY = re.compile(r"special magic \w+ for (.+?) mentioned in the provided text", re.S)
_NIAH_NEEDLE = "One of the special magic {kind} for {key} is: "
_KV_QUERY = re.compile(r'\nKey: "([^"]+)"')


def oracle_answer(prompt: str) -> str:
    """Read the answer from the needle(s) in the prompt, the way a perfect model would."""
    m = _PASSKEY.search(prompt)
    if m:
        return f" {m.group(1)}."
    asked = _KV_QUERY.findall(prompt[-2000:])
    if asked:
        pair = re.search('"' + re.escape(asked[-1]) + r'": "([^"]*)"', prompt)
        if pair:
            return f" {pair.group(1)}"
    queries = _NIAH_QUERY.findall(prompt[-2000:])
    if queries:
        keys = [k.strip() for k in re.split(r",\s*(?:and\s+)?|\s+and\s+", queries[-1]) if k.strip()]
        values = []
        for key in keys:
            for m2 in re.finditer(r"special magic \w+ for " + re.escape(key) + r" is: (\S+?)\.(?:\s|$)", prompt):
                values.append(m2.group(1))
        if values:
            return " " + ", ".join(values) + "."
    return " I don't know."


def _script_line(line: str, where: str) -> dict[str, Any]:
    try:
        d = json.loads(line)
    except ValueError:
        d = None
    if not isinstance(d, dict) or not isinstance(d.get("text"), str):
        raise UsageError(f"backend fake: {where}: a script line must be a JSON object with a \"text\" string "
                         '(and optionally "sample_id"), e.g. {"sample_id": "...", "text": " 42."}')
    return d


class FakeBackend(Backend):
    name: ClassVar[str] = "fake"

    @dataclass
    class Options:
        mode: str = "oracle"
        """oracle | constant | scripted"""
        text: str = " 0."
        """The answer in constant mode."""
        script: str | None = None
        """JSONL file of {"sample_id": ..., "text": ...} (or {"index": i, ...}) for scripted mode."""
        fail_every: int = 0
        """Every Nth request (1-based, counted per process) comes back as an error."""
        miss_beyond: int = 0
        """Oracle answers wrongly for prompts longer than this many tokens (0 = never)."""
        delay_s: float = 0.0
        """Sleep per batch: makes runs slow enough to kill in tests."""
        late_rank: int = -1
        """World rank that sleeps ``late_s`` before its first batch: fixes which rank writes first (fault tests)."""
        late_s: float = 0.0
        """How long ``late_rank`` sleeps before its first batch."""
        raise_on_rank: int = -1
        """World rank that raises inside generate (fault tests)."""
        raise_after: int = 0
        """Number of batches the raising rank completes first."""
        length_delta: int = 0
        """Report n_prompt_tokens off by this much (tests the runner's length check)."""
        tp: int = 1
        """Ranks per replica (FakeTPBackend)."""
        record_dir: str | None = None
        """Where every rank writes a digest of each batch it received (FakeTPBackend)."""
        seconds_per_token: float = 0.0
        """Simulated prefill cost added to the reported latency (not slept): gives latency plots shape."""
        cut_at_budget: bool = False
        """Cut each answer to max_new_tokens tokens (finish_reason ``length``) as a real model's output is, so a
        budget too small for the answer shows in fake runs (off by default: the oracle's whole answer)."""

    def __init__(self, options: Any, ctx: BackendContext) -> None:
        super().__init__(options, ctx)
        if options.mode not in ("oracle", "constant", "scripted"):
            raise UsageError(f"backend fake: mode must be oracle, constant or scripted, not {options.mode!r}")
        self._script: dict[str, str] = {}
        self._script_list: list[str] = []
        if options.mode == "scripted":
            if not options.script or not Path(options.script).is_file():
                raise UsageError("backend fake: mode=scripted needs script=PATH to a JSONL file")
            for i, line in enumerate(Path(options.script).read_text(encoding="utf-8", errors="replace").splitlines()):
                if line.strip():
                    d = _script_line(line, f"{options.script}:{i + 1}")
                    if "sample_id" in d:
                        self._script[str(d["sample_id"])] = d["text"]
                    self._script_list.append(d["text"])
        self._n_requests = 0
        self._n_batches = 0

    def _answer(self, req: GenerationRequest) -> str:
        o = self.options
        if o.mode == "constant":
            return o.text
        if o.mode == "scripted":
            if req.sample_id in self._script:
                return self._script[req.sample_id]
            return self._script_list[self._n_requests % len(self._script_list)] if self._script_list else ""
        if o.miss_beyond and len(req.prompt_ids) > o.miss_beyond:
            return " 99999999."
        return oracle_answer(req.prompt)

    def generate(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        o = self.options
        if o.raise_on_rank == self.ctx.world_rank and self._n_batches >= o.raise_after:
            raise RuntimeError(f"fake backend: injected failure on rank {self.ctx.world_rank}")
        self._record(batch)
        if o.late_rank == self.ctx.world_rank and self._n_batches == 0:
            time.sleep(o.late_s)
        if o.delay_s:
            time.sleep(o.delay_s)
        out: list[GenerationResult] = []
        for req in batch:
            t0 = time.perf_counter()
            self._n_requests += 1
            if o.fail_every and self._n_requests % o.fail_every == 0:
                out.append(GenerationResult(text=None, error="fake backend: injected error",
                                            n_prompt_tokens=len(req.prompt_ids), batch_size=len(batch)))
                continue
            budget = req.max_new_tokens if o.cut_at_budget else None
            text, n_out, finish = self._within_budget(self._answer(req), budget)
            n = len(req.prompt_ids)
            sim = o.seconds_per_token * n
            elapsed = time.perf_counter() - t0 + sim
            out.append(GenerationResult(
                text=text,
                n_prompt_tokens=n + o.length_delta,
                n_output_tokens=n_out,
                latency_s=elapsed,
                ttft_s=elapsed * 0.9 if elapsed else None,
                batch_size=len(batch),
                finish_reason=finish,
                n_cached_prompt_tokens=0,  # no KV cache: every prompt is a cold prefill
            ))
        self._n_batches += 1
        return out

    def _within_budget(self, text: str, max_new_tokens: int | None) -> tuple[str, int | None, str]:
        """(text, output tokens, finish reason) of ``text`` cut to ``max_new_tokens`` (None: whole) as a model's
        output is (``length``)."""
        tok = self.ctx.tokenizer
        if tok is None:
            return text, None, "stop"
        ids = tok.encode(text)
        if max_new_tokens is None or len(ids) <= max_new_tokens:
            return text, len(ids), "stop"
        return tok.decode(ids[:max_new_tokens]), max_new_tokens, "length"

    def _record(self, batch: Sequence[GenerationRequest]) -> None:
        if not self.options.record_dir:
            return
        digest = hashlib.sha1()
        for req in batch:
            digest.update(req.sample_id.encode())
            digest.update(json.dumps(req.prompt_ids).encode())
            digest.update(str(req.max_new_tokens).encode())
        path = Path(self.options.record_dir) / f"rank{self.ctx.world_rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(f"{self.ctx.replica} {self._n_batches} {digest.hexdigest()}\n")
            f.flush()
            os.fsync(f.fileno())

    def info(self) -> dict[str, Any]:
        d = super().info()
        d["model"] = f"fake-{self.options.mode}"
        return d

    def row_columns(self) -> dict[str, Any]:
        return {"backend": self.name, "model": f"fake-{self.options.mode}"}


class FakeTPBackend(FakeBackend):
    """A fake that needs ``tp`` ranks per replica, like a tensor-parallel engine."""

    name: ClassVar[str] = "fake-tp"

    @classmethod
    def ranks_per_replica(cls, options: Any, model: str | None) -> int:
        return max(1, int(options.tp))
