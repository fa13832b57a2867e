"""World rank 0's progress on stderr, drawn by tqdm: samples done, prompt tokens per second, ETA by remaining tokens.

The bar counts tokens, not samples: at long context one 1M-token sample costs as much as a thousand 1K ones, so
its rate and ETA must be by tokens. On a terminal tqdm redraws one line in place; anywhere else (a log file,
mpirun's forwarded stderr, CI) it would write carriage returns, so there each refresh becomes a line of its own,
at most every ``interval_s``, and the final state is printed exactly once.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO


class _Lines:
    """A file for tqdm that turns its in-place redraws (``"\\r" + line``) into whole lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.written = 0
        self.last = ""

    def write(self, s: str) -> None:
        line = s.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
            self.written += 1
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def _columns(stream: TextIO) -> int:
    """The terminal's width; 0 for a terminal that states none (a pty opened without a size, as by ``script`` or
    some container runtimes), where tqdm's in-place bar would draw an empty line: lines are used there instead."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class Progress:
    """``update(samples, tokens, errors)`` per finished batch, ``close()`` once at the end.

    Disabled (draws nothing, imports nothing) when ``enabled`` is false or there is nothing to do."""

    def __init__(self, total_samples: int, total_tokens: int, stream: TextIO | None = None,
                 enabled: bool = True, interval_s: float = 10.0, what: str = "samples") -> None:
        self.total_samples = total_samples
        self.done_samples = 0
        self.errors = 0
        self.what = what
        self.enabled = enabled and total_samples > 0
        self._bar: Any = None
        if not self.enabled:
            return
        from tqdm import tqdm  # imported here: `import evalctx` stays light

        stream = stream or sys.stderr
        self.tty = bool(getattr(stream, "isatty", lambda: False)()) and _columns(stream) > 0
        self._lines = None if self.tty else _Lines(stream)
        self._final_drawn = False
        self._bar = tqdm(
            total=total_tokens, unit="tok", unit_scale=True, file=stream if self.tty else self._lines,
            mininterval=0.2 if self.tty else interval_s, miniters=1, dynamic_ncols=self.tty,
            ncols=None if self.tty else 100, leave=self.tty, ascii=not self.tty,
            bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tokens [{elapsed}<{remaining}, "
                       "{rate_fmt}{postfix}]",
            postfix=self._postfix(),
        )

    def _postfix(self) -> str:
        err = f", {self.errors} errors" if self.errors else ""
        return f"{self.done_samples}/{self.total_samples} {self.what}{err}"

    def update(self, samples: int, tokens: int, errors: int = 0) -> None:
        self.done_samples += samples
        self.errors += errors
        if self._bar is None:
            return
        self._bar.set_postfix_str(self._postfix(), refresh=False)
        before = self._lines.written if self._lines else 0
        self._bar.update(tokens)
        if self._lines and self._lines.written > before:
            self._final_drawn = self.done_samples >= self.total_samples

    def close(self) -> None:
        if self._bar is None:
            return
        if self._lines is not None and not self._final_drawn and str(self._bar).rstrip() != self._lines.last:
            # The final state, once: unless the last update drew it already, or nothing changed since the last
            # line (a run stopped before its first sample would print the start line twice).
            self._lines.write(str(self._bar))
        self._bar.close()
        self._bar = None
