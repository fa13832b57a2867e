"""Shared by the fault tests (test_faults.py, test_mpi_faults.py): an 80-sample suite, the columns that must match
an uninterrupted run, and readers of a run directory."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pandas as pd

# 2 tasks x 4 lengths x 5 depths x 2 samples = 80: the example ("incomplete 79/80" after a torn tail).
SUITE_80 = """name = "s80"
seed = 1
[[tasks]]
task = "passkey"
lengths = [400, 500, 600, 700]
depths = { linear = 5 }
samples = 2
[[tasks]]
task = "niah_single"
lengths = [400, 500, 600, 700]
depths = { linear = 5 }
samples = 2
"""
N = 80
STABLE = ["sample_id", "task", "context_length", "depth", "seed", "target", "completion", "extracted", "score",
          "status", "n_prompt_tokens", "needle_token_index", "prompt_sha1"]


def table(run_dir: Path) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "results.parquet")
    return df[STABLE].sort_values("sample_id").reset_index(drop=True)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def journal_lines(run_dir: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in (run_dir / "journal").glob("*.jsonl"))


def assert_no_torn_line(run_dir: Path) -> None:
    """Every journal ends at a line boundary. An empty one is whole too: a rank whose first batch met the full disk
    cut it back to nothing (under load the other rank often fills the disk before this one's first batch)."""
    for j in (run_dir / "journal").glob("*.jsonl"):
        data = j.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{j.name} ends in a torn line: {data[-80:]!r}"


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[bool]:
    """A tmpfs mounted at ``where`` with ``mount -o OPTIONS`` (``size=100k``); yields False where this machine
    cannot mount one (not root). On the way out it is unmounted, lazily if a process still has a file open in it
    (a rank that a timed-out mpirun left), so that no test leaves a mount behind."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                                   capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted and subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def wait_for_rows(run_dir: Path, n: int, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Until the run's journals hold ``n`` rows. With ``proc`` (the command that writes them), fail at once with
    its exit code and stderr when it ends first: a launcher that failed must not read as a slow one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = None if proc is None else proc.poll()  # before counting: rows written just before the end count
        if (run_dir / "journal").is_dir() and journal_lines(run_dir) >= n:
            return
        if code is not None:
            err = proc.stderr.read() if proc is not None and proc.stderr is not None else ""
            raise AssertionError(f"the command ended (exit {code}) before {n} journal rows: "
                                 f"{err.replace(chr(0), '')[-2000:]}")
        time.sleep(0.02)
    still = "" if proc is None else " (the command is still running)"
    raise AssertionError(f"fewer than {n} journal rows after {timeout} s{still}")
