"""The run directory: its file names, the manifest (atomic rewrite; on a full disk, written into a reserved ballast
file), the final table and summary, all written whole or not at all. The append-only journals are
:mod:`evalctx.results.journal`.

A kill at any moment loses at most the batch in flight (see :mod:`evalctx.results.journal`): every file here is
written under a unique temporary name and renamed. Files are created with mode 0666 minus the umask, like any
other tool's output, so a shared nightly folder stays readable by teammates. Who may write a run directory at all
is :mod:`evalctx.results.lock`'s concern.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterator

from evalctx.errors import RunFailed, UsageError

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


def _type_name(t: type, item: type | None) -> str:
    if t is type(None):
        return "null"
    if t in (int, float):
        return "number"
    if t is list and item is not None:
        return f"list of {_type_name(item, None)}s"
    return {str: "string", dict: "object"}.get(t, t.__name__)


# ---------------------------------------------------------------------------------------------------------------
