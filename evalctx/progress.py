"""A dependency-free progress line on stderr: samples done, prompt tokens per second, ETA by remaining tokens.

ETA counts tokens, not samples: at long context one 1M-token sample costs as much as a thousand 1K ones.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_s(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, total_samples: int, total_tokens: int, stream: TextIO | None = None,
                 enabled: bool = True, interval_s: float = 10.0) -> None:
        self.total_samples = total_samples
        self.total_tokens = total_tokens
        self.done_samples = 0
        self.done_tokens = 0
        self.errors = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled and total_samples > 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = 0.2 if self.tty else interval_s
        self.t0 = time.monotonic()
        self._last = 0.0
        self._last_line = ""

    def update(self, samples: int, tokens: int, errors: int = 0) -> None:
        self.done_samples += samples
        self.done_tokens += tokens
        self.errors += errors
        self._draw()

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = self.done_tokens / elapsed if elapsed > 0 else 0.0
        eta = (self.total_tokens - self.done_tokens) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done_samples / self.total_samples if self.total_samples else 100.0
        err = f" | {self.errors} errors" if self.errors else ""
        return (f"[{self.done_samples}/{self.total_samples} samples {pct:5.1f}%] {rate:,.0f} tok/s | "
                f"elapsed {_fmt_s(elapsed)} | ETA {_fmt_s(eta)}{err}")

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval_s and self.done_samples < self.total_samples:
            return
        self._last = now
        line = self.line()
        if line == self._last_line:
            return
        self._last_line = line
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(force=True)
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
