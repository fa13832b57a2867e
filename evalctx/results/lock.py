"""Who may write a run directory: one command at a time, and no straggling rank of an earlier one.

Two advisory ``flock(2)`` locks, both released by the kernel when their process dies, so a ``kill -9`` never
leaves one stuck:

* ``.lock`` is held exclusively by world rank 0 for the whole command. It holds one JSON line saying who holds it
  (pid, host, command, start time, a random attempt id), so that a second command can say who is in the way.
* ``.writers`` is held shared by every rank that appends to a journal (each replica leader). A killed ``mpirun``
  leaves its ranks running for seconds; rank 0 of a new command takes this lock exclusively once, after ``.lock``,
  so it starts only when no journal writer of an earlier command is alive.

A rank of an earlier command that was told to start just before its rank 0 died could still take ``.writers``
after the new command checked it: it then finds another attempt id in ``.lock`` and stops before writing.
Readers (reports, ``load_runs``) take no lock: journals are append-only and every other file is renamed in whole.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalctx.errors import UsageError

LOCK = ".lock"
WRITERS = ".writers"


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise UsageError(f"cannot write in {path.parent}: read-only file system; pass another --out") from None
        raise UsageError(f"cannot write in {path.parent}: {exc.strerror}; pass another --out") from None


def _read(fd: int) -> dict[str, Any]:
    """The holder record, whole: it holds the command line, which a long label, option or path makes any length
    (a fixed-size read cut it and read as "no holder yet", a false "taken by another process")."""
    try:
        size = os.fstat(fd).st_size
        data = json.loads(os.pread(fd, max(size, 1), 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_holder(fd: int) -> dict[str, Any]:
    """Who holds the lock: it writes that just after taking the lock, so give it a moment (at most 0.5 s)."""
    for _ in range(25):
        holder = _read(fd)
        if holder.get("pid"):
            return holder
        time.sleep(0.02)
    return holder


def _write(fd: int, holder: dict[str, Any]) -> None:
    data = (json.dumps(holder) + "\n").encode("utf-8") if holder else b""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:
        pass  # who holds the lock is only ever shown in a message; the flock itself is what excludes


def describe(holder: dict[str, Any]) -> str:
    """``pid 123 on node7 since 2026-01-01T02:00:00+00:00``, or "another process" when the holder is unknown."""
    if not holder.get("pid"):
        return "another process"
    return f"pid {holder['pid']} on {holder.get('host', '?')} since {holder.get('started_at', '?')}"


def _command(holder: dict[str, Any]) -> str:
    return f"; its command: {holder['command']}" if holder.get("command") else ""


@dataclass
class OwnerLock:
    """World rank 0's exclusive hold on a run directory; ``attempt_id`` tells this command's ranks apart."""

    fd: int
    attempt_id: str

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


def _free(fd: int, how: int) -> bool:
    """Whether ``how`` (LOCK_EX or LOCK_SH) could be taken on ``fd`` right now; closes ``fd``, which releases it."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _writers_idle(run_dir: Path) -> bool:
    return _free(_open(run_dir / WRITERS), fcntl.LOCK_EX)


def acquire(run_dir: Path, command: str, started_at: str) -> OwnerLock:
    """Take the run directory for this command, without waiting. Raises UsageError naming the holder when another
    command has it, or when journal writers of an earlier command are still alive."""
    fd = _open(run_dir / LOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise UsageError(f"run dir {run_dir} is in use by {describe(holder)}: wait for it to end, or pass "
                         f"another --run-id{_command(holder)}") from None
    previous = _read(fd)
    attempt_id = uuid.uuid4().hex
    # The new attempt id goes in before the writers check (see the module docstring).
    _write(fd, {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started_at": started_at,
                "attempt_id": attempt_id})
    if not _writers_idle(run_dir):
        _write(fd, previous)
        os.close(fd)
        raise UsageError(f"ranks of an earlier command ({describe(previous)}) are still writing journals in "
                         f"{run_dir} (a killed mpirun leaves its ranks running for seconds): wait for them to end, "
                         f"then rerun{_command(previous)}")
    return OwnerLock(fd, attempt_id)


def join_writers(run_dir: Path, attempt_id: str) -> int:
    """Hold the writers lock (shared) for a rank that will append to a journal; returns its descriptor (close it to
    release). Raises UsageError when the run directory now belongs to another command."""
    fd = _open(run_dir / WRITERS)
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits at most for a new command's one-off check
    with open(run_dir / LOCK, "rb") as f:
        holder = _read(f.fileno())
    if holder.get("attempt_id") != attempt_id:
        os.close(fd)
        raise UsageError(f"run dir {run_dir} was taken by {describe(holder)}: this rank of an earlier command "
                         "stops without writing")
    return fd


def is_held(run_dir: Path) -> bool:
    """Whether a live command holds the run directory (for readers that want to tell running from killed)."""
    path = run_dir / LOCK
    return path.is_file() and not _free(os.open(path, os.O_RDONLY), fcntl.LOCK_SH)
