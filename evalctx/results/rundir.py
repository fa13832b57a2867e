"""The run directory: manifest (atomic rewrite), append-only journals (fsync per batch), final table and summary.

A kill at any moment loses at most the batch in flight: journals are appended and flushed per batch, a torn last
line is ignored on read, and the final files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

JOURNAL_DIR = "journal"
MANIFEST = "manifest.json"
RESULTS = "results.parquet"
SUMMARY = "summary.csv"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(run_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    p = run_dir / MANIFEST
    if not p.is_file():
        return None
    return json.loads(p.read_text(encoding="utf-8"))


class Journal:
    """One append-only JSONL file per writer: ``replica-R`` (its leader) or ``preflight`` (world rank 0)."""

    def __init__(self, run_dir: Path, name: str, folder: str = JOURNAL_DIR) -> None:
        self.path = run_dir / folder / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, default=str) + "\n" for r in rows)
        if not lines:
            return
        self._f.write(lines)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def read_jsonl(folder: Path) -> Iterator[dict[str, Any]]:
    """The records with a ``sample_id`` of every ``*.jsonl`` file in ``folder``, file by file, in file order."""
    if not folder.is_dir():
        return
    for p in sorted(folder.glob("*.jsonl")):
        with p.open("r", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn write of a killed process: that batch was not finished
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "sample_id" in row:  # else not a record of ours
                    yield row


def read_journals(run_dir: Path) -> dict[str, dict[str, Any]]:
    """All journaled rows by sample id; a later row for the same id wins (a retried error row)."""
    rows: dict[str, dict[str, Any]] = {}
    entries: list[dict[str, Any]] = []
    for row in read_jsonl(run_dir / JOURNAL_DIR):
        extra = row.pop("extra", None)  # rows are written flat; tolerate an unflattened one
        if isinstance(extra, dict):
            for k, v in extra.items():
                row.setdefault(k, v)
        entries.append(row)
    # Across journals (a rerun with another rank count writes other replica files) order by finish time.
    entries.sort(key=lambda r: r.get("finished_at") or 0.0)
    for r in entries:
        prev = rows.get(r["sample_id"])
        if prev is not None and prev.get("status") == "ok" and r.get("status") != "ok":
            continue  # never replace a finished answer with a later failure
        rows[r["sample_id"]] = r
    return rows
