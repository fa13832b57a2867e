"""`import evalctx` (and the CLI module) must not pull in heavy optional dependencies."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "mpi4py", "matplotlib", "tensorrt_llm", "scipy")


def test_import_is_light() -> None:
    code = (
        "import sys, evalctx, evalctx.cli, evalctx.config, evalctx.run.runner, evalctx.backends.base;"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout}"
