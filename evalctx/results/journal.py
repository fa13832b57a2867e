"""The append-only journals of a run directory: one JSONL file per writer (``replica-R``, ``preflight``), every
row carrying the configuration hash, appended and fsynced per batch; torn tails repaired before anyone appends;
rows checked for shape and merged by sample id when read back. The manifest and atomic writes are
:mod:`evalctx.results.rundir`.

A kill at any moment loses at most the batch in flight: a batch that could not be written whole (a full disk, a
signal mid-write) is cut back off, and a torn last line left by a kill -9 is repaired before the next run appends.
The same reading and repair serve the prompt log of ``--log-samples`` (:mod:`evalctx.results.prompts`).
"""

from __future__ import annotations

import contextlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from evalctx.errors import UsageError
from evalctx.results.rundir import PROMPTS_DIR, StorageError, _type_name

JOURNAL_DIR = "journal"


def _accepted(hint: Any) -> tuple[type, ...]:
    """The JSON value types a field annotated ``hint`` takes: numbers as int or float alike."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _accepted(arg))
    if hint in (int, float):
        return (int, float)
    return (typing.get_origin(hint) or hint,)


def _row_types() -> dict[str, tuple[tuple[type, ...], type | None]]:
    """Field -> (accepted types, item type of a list field) for every field of a results row."""
    from evalctx.records import SampleRecord

    out = {}
    for name, hint in typing.get_type_hints(SampleRecord).items():
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        out[name] = (_accepted(hint), item)
    out.pop("extra")
    return out


# A journal row of the wrong shape is refused where the journals are read, before any work, instead of breaking
# results.parquet (or a score) once the run is over.
_ROW_TYPES = _row_types()
_ROW_REQUIRED = ("sample_id", "task", "status", "context_length", "depth")


def journal_folder(run_dir: Path) -> Path:
    folder = run_dir / JOURNAL_DIR
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file, not the journal folder: move it away")
    return folder


def _complete_row(data: bytes) -> bool:
    try:
        row = json.loads(data)
    except ValueError:
        return False
    return isinstance(row, dict) and "sample_id" in row


def repair_tail(path: Path, complete: Callable[[bytes], bool] = _complete_row) -> int:
    """Make ``path`` end at a line boundary before anyone appends to it; returns the bytes dropped. ``complete``
    tells a whole row that lacks only its newline (default: a journal row).

    A kill -9 or a full disk mid-write leaves a last line without its newline: appending after it would glue the
    next row onto it and lose both. A tail that is a whole row missing only its newline gets the newline; anything
    else is cut off (it was never a readable row)."""
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        start, pos = 0, size
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            i = f.read(step).rfind(b"\n")
            if i >= 0:
                start = pos + i + 1
                break
        f.seek(start)
        if complete(f.read()):
            f.write(b"\n")
            dropped = 0
        else:
            f.truncate(start)
            dropped = size - start
        f.flush()
        os.fsync(f.fileno())
        return dropped


def repair_journals(run_dir: Path) -> list[str]:
    """Repair every journal's tail, and the prompt log's (``--log-samples``), with the run-dir lock held; one note
    per file that had a torn line."""
    folders = [journal_folder(run_dir), run_dir / PROMPTS_DIR]
    notes = []
    for p in [q for folder in folders if folder.is_dir() for q in sorted(folder.glob("*.jsonl"))]:
        try:
            dropped = repair_tail(p)
        except OSError as exc:
            raise StorageError(p, exc) from exc
        if dropped:
            notes.append(f"{p}: dropped a torn last line ({dropped} bytes, left by a kill or a full disk); "
                         "its samples run again")
    return notes


class Journal:
    """One append-only JSONL file per writer: ``replica-R`` (its leader) or ``preflight`` (world rank 0).

    Every row carries ``config_hash``, so rows are never adopted by a run of another configuration, even with the
    manifest gone. ``folder``: the journal folder, or another folder of per-sample records (the prompt log)."""

    def __init__(self, run_dir: Path, name: str, config_hash: str, folder: str = JOURNAL_DIR) -> None:
        self.path = (journal_folder(run_dir) if folder == JOURNAL_DIR else run_dir / folder) / f"{name}.jsonl"
        self.config_hash = config_hash
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise StorageError(self.path, exc) from exc

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append whole rows and fsync; on any failure before the last byte is written, cut back to where the
        file was, so that no torn line is left. Raises StorageError for a failed write."""
        data = "".join(json.dumps({**r, "config_hash": self.config_hash}, default=str) + "\n"
                       for r in rows).encode("utf-8")
        if not data:
            return
        start = os.lseek(self._fd, 0, os.SEEK_END)
        view, whole = memoryview(data), False
        try:
            while view:
                view = view[os.write(self._fd, view):]
            whole = True
            os.fsync(self._fd)
        except BaseException as exc:
            if not whole:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
            if isinstance(exc, OSError):
                raise StorageError(self.path, exc) from exc
            raise

    def close(self) -> None:
        os.close(self._fd)


def _check_row(row: dict[str, Any], where: str) -> None:
    fix = "the journal was edited or written by another program; remove that line (its sample runs again)"
    for key in _ROW_REQUIRED:
        if key not in row:
            raise UsageError(f"{where}: journal row lacks {key!r}: {fix}")
    for key, (accepted, item) in _ROW_TYPES.items():
        if key not in row:
            continue
        v = row[key]
        wrong_item = item is not None and isinstance(v, list) and not all(isinstance(x, item) for x in v)
        # bool is refused where a number is expected (it is an int in Python)
        if not isinstance(v, accepted) or (isinstance(v, bool) and bool not in accepted) or wrong_item:
            want = " or ".join(dict.fromkeys(_type_name(t, item) for t in accepted))
            raise UsageError(f"{where}: journal row has {key}={v!r:.60}, not {want}: {fix}")


def iter_journal_rows(run_dir: Path, problems: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every row of every journal, in file order (see :func:`read_jsonl`). Raises UsageError for a row of the
    wrong shape."""
    for row in read_jsonl(journal_folder(run_dir), problems, _check_row):
        extra = row.pop("extra", None)  # rows are written flat; tolerate an unflattened one
        if isinstance(extra, dict):
            for k, v in extra.items():
                row.setdefault(k, v)
        yield row


def read_jsonl(folder: Path, problems: list[str] | None = None,
               check: Callable[[dict[str, Any], str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The records with a ``sample_id`` of every ``*.jsonl`` file in ``folder``, file by file, in file order. A
    torn last line (a writer killed mid-write, or one still writing) ends a file; an unreadable line elsewhere is
    skipped and noted in ``problems``; ``check(row, where)`` may raise for a row of the wrong shape."""
    if not folder.is_dir():
        return
    for p in sorted(folder.glob("*.jsonl")):
        with p.open("r", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    break
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if problems is not None:
                        problems.append(f"{p}:{lineno}: not a JSON row (a torn write); skipped, its sample runs "
                                        "again")
                    continue
                if not isinstance(row, dict) or "sample_id" not in row:
                    continue  # not a record of ours
                if check is not None:
                    check(row, f"{p}:{lineno}")
                yield row


def journal_config_hashes(run_dir: Path) -> set[str | None]:
    """The configuration hashes the journal rows carry (None for rows written before rows carried one)."""
    return {r.get("config_hash") for r in iter_journal_rows(run_dir)}


def read_journals(run_dir: Path, config_hash: str | None = None,
                  problems: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """All journaled rows by sample id; a later row for the same id wins (a retried error row).

    With ``config_hash``, rows of another configuration are left out (and noted in ``problems``); rows without a
    hash predate it and are kept (the caller has checked the manifest)."""
    entries = []
    foreign = 0
    unscored = 0
    for row in iter_journal_rows(run_dir, problems):
        if config_hash is not None and row.get("config_hash", config_hash) != config_hash:
            foreign += 1
            continue
        if row.get("status") == "ok" and (not isinstance(row.get("completion"), str)
                                          or not isinstance(row.get("score"), (int, float))):
            unscored += 1  # not an answer: its sample runs again
            continue
        entries.append(row)
    if unscored and problems is not None:
        problems.append(f"{run_dir}: {unscored} journal row(s) marked ok without a completion and a score (edited "
                        "or written by another program) left out; their samples run again")
    if foreign and problems is not None:
        problems.append(f"{run_dir}: {foreign} journal row(s) of another configuration left out")
    # Across journals (a rerun with another rank count writes other replica files) order by finish time.
    entries.sort(key=lambda r: r.get("finished_at") or 0.0)
    rows: dict[str, dict[str, Any]] = {}
    conflicts = 0
    for r in entries:
        prev = rows.get(r["sample_id"])
        if prev is not None and prev.get("status") == "ok":
            if r.get("status") != "ok":
                continue  # never replace a finished answer with a later failure
            # Two ok answers for one sample: two commands ran it. The later one stands, and not silently.
            conflicts += r.get("completion") != prev.get("completion")
        rows[r["sample_id"]] = r
    if conflicts and problems is not None:
        problems.append(f"{run_dir}: {conflicts} sample(s) were answered twice with different answers (two commands "
                        "ran them); the later answer of each is kept")
    return rows
