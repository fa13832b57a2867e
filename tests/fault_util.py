"""Shared by the fault tests (test_faults.py, test_mpi_faults.py): an 80-sample suite, the columns that must match
an uninterrupted run, and readers of a run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

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


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def wait_for_rows(run_dir: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "journal").is_dir() and journal_lines(run_dir) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} journal rows after {timeout} s")
