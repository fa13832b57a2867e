"""What a run's manifest records about where it ran: the package versions, evalctx's git commit, the GPUs."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("evalctx", "numpy", "pandas", "pyarrow", "torch", "transformers", "tokenizers", "mpi4py",
                "tensorrt_llm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def gpus() -> list[str]:
    torch = sys.modules.get("torch")  # only if a backend already imported it: never import torch for this
    if torch is None or not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
