"""``n_output_tokens`` means one thing in every backend: the generated tokens of the completion, the stopping EOS
not counted; decode tokens/s still counts the EOS step."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from evalctx.cli import main
from evalctx.records import GenerationResult, Sample
from evalctx.run.rows import make_record
from evalctx.models.tokenizer import load_tokenizer

SUITE = """
name = "eos"
[[tasks]]
task = "passkey"
lengths = [256]
depths = [0.0, 1.0]
samples = 2
max_new_tokens = 12
"""


def _run(tmp_path: Path, *args: str) -> pd.DataFrame:
    suite = tmp_path / "s.toml"
    suite.write_text(SUITE)
    assert main(["run", "--suite", str(suite), "--out", str(tmp_path), "--run-id", "r", "--no-progress",
                 *args]) == 0
    return pd.read_parquet(tmp_path / "r" / "results.parquet")


def _completion_tokens(df: pd.DataFrame, tokenizer: str) -> list[int]:
    tok = load_tokenizer(tokenizer)
    return [len(tok.encode(c)) for c in df["completion"]]


def test_hf_does_not_count_the_stopping_eos(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    df = _run(tmp_path, "--backend", "hf", "--model", "tiny", "--backend-opt", "device=cpu")
    # The embedded model answers " 12345." and stops on EOS well inside the 12-token budget.
    assert (df["finish_reason"] == "stop").all() and (df["score"] == 1.0).all(), df[["completion", "finish_reason"]]
    assert df["n_output_tokens"].tolist() == _completion_tokens(df, "tiny")
    # Decode steps: every token after the first (prefill's) plus the EOS step.
    steps = df["n_output_tokens"]
    expected = steps / (df["latency_s"] - df["ttft_s"])
    assert df["decode_tokens_per_s"].tolist() == pytest.approx(expected.tolist())


def test_fake_counts_the_completion_with_the_runs_tokenizer(tmp_path: Path) -> None:
    df = _run(tmp_path, "--backend", "fake", "--tokenizer", "tiny")
    assert df["n_output_tokens"].tolist() == _completion_tokens(df, "tiny")
    assert (df["n_output_tokens"] > 1).all()  # " 12345." is several tokens, not one word


def _sample() -> Sample:
    return Sample(id="s", task="passkey", context_length=4, depth=0.5, seed=0, prompt="abc", prompt_ids=[1, 2, 3, 4],
                  target=["7"], needle_token_index=1, max_new_tokens=4)


@pytest.mark.parametrize("finish, n_out, rate", [
    ("stop", 3, 3 / 0.5),    # 3 answer tokens + EOS: 3 decode steps after prefill's token
    ("length", 4, 3 / 0.5),  # cut at the budget: 4 tokens, 3 decode steps
    ("stop", 0, None),       # EOS first: no decode step
])
def test_decode_rate_counts_the_eos_step(finish: str, n_out: int, rate: float | None) -> None:
    res = GenerationResult(text=" 7.", n_prompt_tokens=4, n_output_tokens=n_out, latency_s=0.75, ttft_s=0.25,
                           finish_reason=finish)
    row = make_record("r", _sample(), res, 0, {})
    assert row["decode_tokens_per_s"] == (pytest.approx(rate) if rate else None)
