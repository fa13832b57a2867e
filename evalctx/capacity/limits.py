"""What one run can hold, checked before any work: a typo (``samples = 10000000``, ``{linear = 100000000}``, a
length with three zeros too many) is refused in a line instead of enumerating or building for minutes.

* at most :data:`MAX_SAMPLES` samples per suite (lengths x depths x samples, summed over its tasks),
* at most :data:`MAX_DEPTHS` needle depths per task,
* no length whose prompt cannot be built in this machine's memory: building a sample holds the text, its token ids
  and their character offsets in Python objects, measured at 140-230 bytes per token (byte and tiny tokenizers,
  16K-64K tokens, tracemalloc peak); :data:`PROMPT_BYTES_PER_TOKEN` rounds that up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evalctx.errors import UsageError

MAX_SAMPLES = 1_000_000
MAX_DEPTHS = 1_000
PROMPT_BYTES_PER_TOKEN = 256


def check_depth_count(n: int, where: str = "depths") -> int:
    if n > MAX_DEPTHS:
        raise UsageError(f"{where}: {n:,} depths is more than the {MAX_DEPTHS:,} a task holds (a depth grid of 35 is "
                         "already fine-grained)")
    return n


def memory_bytes() -> int | None:
    """Physical memory, or the cgroup (v2) limit when lower; None where neither can be read."""
    try:
        total: int | None = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(int(limit), total) if total else int(limit)
    except OSError:
        pass
    return total


def check_prompt_memory(length: int, where: str = "lengths") -> None:
    need = length * PROMPT_BYTES_PER_TOKEN
    have = memory_bytes()
    if have and need > have:
        raise UsageError(f"{where}: a {length:,}-token prompt needs about {need / 1e9:,.1f} GB to build "
                         f"(~{PROMPT_BYTES_PER_TOKEN} bytes per token), more than this machine's "
                         f"{have / 1e9:,.1f} GB: use shorter lengths")


def check_suite(suite: Any) -> None:
    """Raise UsageError when ``suite`` (an :class:`evalctx.config.Suite`) is too large to run; see the module."""
    total = 0
    for i, t in enumerate(suite.tasks):
        check_depth_count(len(t.depths), f"tasks[{i}] ({t.task}): depths")
        total += len(t.lengths) * len(t.depths) * t.samples
        check_prompt_memory(max(t.lengths), f"tasks[{i}] ({t.task}): lengths")
    if total > MAX_SAMPLES:
        raise UsageError(f"suite {suite.name!r} expands to {total:,} samples (lengths x depths x samples, summed "
                         f"over tasks), more than the {MAX_SAMPLES:,} one run holds: use fewer samples per cell, "
                         "or split it into several suites")
