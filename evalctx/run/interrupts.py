"""Signals a command turns into exceptions: SIGTERM stops a run the way Ctrl-C does.

Schedulers (Slurm, Kubernetes, a nightly timeout) and mpirun stop jobs with SIGTERM, which by default kills Python
at once: the manifest would still say "running" and nothing would be printed. Raised as :class:`Interrupted` (a
KeyboardInterrupt), it takes the Ctrl-C path instead: status interrupted, one line, rerun to resume. Open MPI's
mpirun, on SIGINT or SIGTERM, sends its ranks SIGCONT then SIGTERM and, about 0.25 s later, SIGKILL; a rank that
is inside a long native call (a prefill) when SIGTERM comes may not get to record its status, which a reader
then sees as a "running" manifest whose run-dir lock nobody holds.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator


class Interrupted(KeyboardInterrupt):
    """A stop signal other than Ctrl-C, raised in the main thread like KeyboardInterrupt; ``signame`` says which."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


def signal_name(exc: BaseException) -> str:
    """``SIGTERM`` for an :class:`Interrupted`, ``SIGINT`` for a plain KeyboardInterrupt (Ctrl-C)."""
    return exc.signame if isinstance(exc, Interrupted) else "SIGINT"


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """While a command runs: the first SIGTERM raises :class:`Interrupted` (later ones are ignored while the run
    records its status), and SIGXFSZ is ignored, so that a file-size limit (``ulimit -f``) is a write error the run
    reports (EFBIG) instead of a silent death. Previous handlers come back afterwards; outside the main thread
    (where Python delivers no signals) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted("SIGTERM")

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_term)}
    if hasattr(signal, "SIGXFSZ"):
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
