"""The run directory: manifest (atomic rewrite), append-only journals (fsync per batch), final table and summary.

A kill at any moment loses at most the batch in flight: journals are appended and fsynced per batch, a batch that
could not be written whole (a full disk, a signal mid-write) is cut back off, a torn last line left by a kill -9 is
repaired before the next run appends, and every other file is written under a unique temporary name and renamed.
Files are created with mode 0666 minus the umask, like any other tool's output, so a shared nightly folder stays
readable by teammates. Who may write a run directory at all is :mod:`evalctx.results.lock`'s concern.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import types
import typing
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from evalctx.errors import RunFailed, UsageError

JOURNAL_DIR = "journal"
PROMPTS_DIR = "prompts"
"""The prompt log of ``--log-samples`` (see :mod:`evalctx.results.prompts`)."""
MANIFEST = "manifest.json"
RESULTS = "results.parquet"
SUMMARY = "summary.csv"
RESERVE = ".reserve"
"""Ballast file: on a full disk it becomes the last manifest (status failed), which then needs no new space."""
RESERVE_BYTES = 64 * 1024
_TMP_SUFFIX = ".tmp"
_NAME_MAX_BYTES = 200
_NOT_IN_NAMES = re.compile(r"[/\\\x00-\x1f\x7f]")


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
# The manifest fields that evalctx reads back (resume, reports, show, the gate): one of another type (a manifest
# edited by hand) is a one-line error, not a traceback wherever it is first used.
_STR, _NUM, _DICT = (str, type(None)), (int, float, type(None)), (dict, type(None))
_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "run_id": _STR, "label": _STR, "status": _STR, "created_at": _STR, "finished_at": _STR, "config_hash": _STR,
    "attempt_id": _STR, "command": _STR, "model": _STR, "stopped_by": _STR, "git_sha": _STR,
    "n_samples": _NUM, "batch_size": _NUM, "error_rate": _NUM, "max_error_rate": _NUM, "schema_version": _NUM,
    "suite": _DICT, "backend": _DICT, "tokenizer": _DICT, "model_fingerprint": _DICT, "versions": _DICT,
    "world": _DICT, "counts": _DICT, "chat_template": _DICT, "identity": _DICT,
}


class StorageError(RunFailed):
    """A write in the run directory failed (no space, quota, read-only or I/O error): ``path`` and the ``OSError``."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"cannot write {path}: {exc.strerror or exc}")
        self.path = path
        self.errno = exc.errno
        self.strerror = exc.strerror or str(exc)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_name(value: str, what: str) -> str:
    """``value`` if it can name a folder directly under ``--out``; otherwise UsageError. Run ids and suite names are
    names, never paths: no separator, no leading ``.`` (``..``, hidden files) or ``-``, at most 200 bytes."""
    if (not value or value.startswith((".", "-")) or _NOT_IN_NAMES.search(value)
            or len(value.encode("utf-8", "surrogateescape")) > _NAME_MAX_BYTES):
        raise UsageError(f"{what} {value!r} is not a name: use letters, digits, '_', '-' and '.' (no '/' or '\\', "
                         f"not starting with '.' or '-', at most {_NAME_MAX_BYTES} bytes)")
    return value


def safe_name_part(text: str) -> str:
    """``text`` with every character a name cannot hold replaced by ``_`` (for run ids derived from labels)."""
    return _NOT_IN_NAMES.sub("_", text).lstrip(".-") or "_"


# ---------------------------------------------------------------------------------------------------------------
def _tmp_path(path: Path) -> Path:
    # Unique per writer: two processes never share a temporary file, and a crashed one's leftover is recognisable.
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{_TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_file(path: Path, binary: bool = False) -> Iterator[IO[Any]]:
    """A file written under a unique temporary name beside ``path`` and renamed onto it (after an fsync) only when
    the block ends without an exception; otherwise removed, so that a failed or interrupted write never leaves a
    partial file that looks whole. Text is UTF-8. Raises StorageError for a failed open, write or rename (an
    OSError inside the block is taken for a failed write)."""
    tmp = _tmp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any file
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (temporary file, fsync, rename). Raises StorageError."""
    with atomic_file(path, binary=True) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_parquet(df: Any, path: Path) -> None:
    """A pandas DataFrame as parquet, whole or not at all. Raises StorageError."""
    tmp = _tmp_path(path)
    try:
        df.to_parquet(tmp, index=False)
        fd = os.open(tmp, os.O_RDONLY)  # on disk before the rename, as for every other file here
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:  # pyarrow's IO errors are OSErrors too
        tmp.unlink(missing_ok=True)
        raise StorageError(path, exc) from exc
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        import pyarrow

        if isinstance(exc, pyarrow.ArrowException):  # a column of mixed types: rows the journal check cannot know
            what = "; ".join(str(a) for a in exc.args)
            raise UsageError(f"cannot write {path}: {what}: a journal row holds a value of another type in that "
                             "column (a journal edited or written by another program); remove that line (its "
                             "sample runs again)") from None
        raise


def remove_dead_temporaries(path: Path) -> list[Path]:
    """Temporary files :func:`atomic_file` left for ``path`` when its writer was killed (the pid in the name no
    longer runs); removed, and returned. Safe while another live writer works on the same path."""
    removed = []
    for p in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
        pid = p.name[len(path.name) + 2:].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or not ours to signal): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of a killed writer (call with the run-dir lock held, when no one else writes)."""
    for p in run_dir.glob(f".*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            p.unlink()


def reserve_space(run_dir: Path, n_bytes: int = RESERVE_BYTES) -> None:
    """Allocate the ballast file (real blocks, not a sparse file). Raises StorageError on a full disk."""
    path = run_dir / RESERVE
    if path.is_file() and path.stat().st_size >= n_bytes:
        return
    atomic_write_bytes(path, b"\0" * n_bytes)


def release_space(run_dir: Path) -> None:
    """Remove the ballast (at the end of a run: it is only needed while one writes)."""
    with contextlib.suppress(OSError):
        (run_dir / RESERVE).unlink()


def _write_into_reserve(run_dir: Path, data: bytes) -> bool:
    """Turn the ballast into ``manifest.json``: overwrite its blocks and rename it. On a full disk this needs no new
    space, and other ranks still appending cannot take it first (as they could take space freed by deleting it).
    False when there is no ballast (another rank used it) or it is smaller than ``data``."""
    path = run_dir / RESERVE
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two failing ranks: one uses it, the other finds it gone
        if os.fstat(fd).st_size < len(data) or os.fstat(fd).st_ino != os.stat(path).st_ino:
            return False
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
        os.replace(path, run_dir / MANIFEST)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
def write_manifest(run_dir: Path, manifest: dict[str, Any], disk_full: bool = False) -> None:
    """Rewrite manifest.json atomically. ``disk_full``: write it into the ballast first (see reserve_space)."""
    data = (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")
    if not (disk_full and _write_into_reserve(run_dir, data)):
        atomic_write_bytes(run_dir / MANIFEST, data)


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The manifest, or None when there is none. Raises UsageError when it is not a readable JSON object."""
    p = run_dir / MANIFEST
    if not p.exists():
        return None
    fix = "restore it, or remove it (the journals' configuration hash then identifies the run)"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p}: unreadable ({getattr(exc, 'strerror', None) or exc}): {fix}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno}): {fix}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{p}: holds a JSON {type(data).__name__}, not an object: {fix}")
    for key, types_ in _MANIFEST_TYPES.items():
        v = data.get(key)
        if key in data and (not isinstance(v, types_) or (isinstance(v, bool) and bool not in types_)):
            want = " or ".join(dict.fromkeys(_type_name(t, None) for t in types_))
            raise UsageError(f"{p}: {key} is {v!r:.60}, not {want}: {fix}")
    return data


def stopped_by(run_dir: Path, attempt_id: str) -> str | None:
    """Why this attempt stopped, if a rank has already recorded it in the manifest; None otherwise."""
    try:
        m = read_manifest(run_dir)
    except UsageError:
        return None
    if m is None or m.get("attempt_id") != attempt_id or m.get("status") == "running":
        return None
    return str(m.get("stopped_by") or m.get("status"))


def mark_stopped(run_dir: Path, status: str, attempt_id: str, reason: str, disk_full: bool = False) -> bool:
    """Set the status of a manifest that this attempt wrote and that still says running (any rank may call it:
    whichever rank handles a signal or a failure first records it before the job is aborted). True when the
    manifest says so afterwards."""
    try:
        m = read_manifest(run_dir)
        if m is None or m.get("attempt_id") != attempt_id:
            return False
        if m.get("status") == "running":
            m.update(status=status, finished_at=utc_now(), stopped_by=reason)
            write_manifest(run_dir, m, disk_full)
        return m.get("status") == status
    except (UsageError, RunFailed):
        return False  # the error being reported matters more than the manifest


# ---------------------------------------------------------------------------------------------------------------
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


def _type_name(t: type, item: type | None) -> str:
    if t is type(None):
        return "null"
    if t in (int, float):
        return "number"
    if t is list and item is not None:
        return f"list of {_type_name(item, None)}s"
    return {str: "string", dict: "object"}.get(t, t.__name__)


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
