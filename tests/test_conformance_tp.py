"""Every family of the conformance suite under tensor parallelism: ``mpirun -n 2 evalctx conformance --family all
--backend-opt tp=2`` (gloo on CPU, transformers' tp plan) answers as each model's own generate on one process, with
chunks that cross the families' thresholds, prefix reuse on and off, batch 1 and 3."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' tp plan on CPU needs it

from mpi_util import mpi_env, mpirun_cmd  # noqa: E402

pytestmark = pytest.mark.mpi


def test_every_family_at_tp2_answers_as_its_own_generate(tmp_path: Path) -> None:
    out = tmp_path / "matrix.md"
    cmd = mpirun_cmd(2, "conformance", "--family", "all", "--backend-opt", "tp=2", "--chunk-sizes", "48",
                     "--batch-sizes", "1", "3", "--markdown", str(out))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=mpi_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()[2:]]
    assert len(rows) == 16 * 2 * 2 * 2  # families x reuse x batch x lengths
    assert all(r[-1] == "ok" and r[5] == "6/6" for r in rows)
    assert proc.stdout.count("| model |") == 1  # one table, from world rank 0
