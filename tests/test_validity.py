"""Issue 10's examples, one test per kind of silent error, each with the example's right value.

The widening tests live next to the code they check (test_tasks, test_placement, test_scoring, test_preflight,
test_tokenizer, test_identity, test_plan).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from evalctx.cli import main
from evalctx.scoring import score

DATA = Path(__file__).parent / "data"


def _write_suite(path: Path, body: str) -> str:
    path.write_text(body)
    return str(path)


# -- 4. scorers and the target column -----------------------------------------------------------------------------
def test_kind4_targets_are_lists_and_rescoring_from_the_parquet_agrees(tmp_path: Path) -> None:
    suite = _write_suite(tmp_path / "s.toml", 'name = "s"\n[[tasks]]\ntask = "niah_single"\nlengths = [500]\n'
                                              "depths = [0.5]\nsamples = 5\n")
    code = main(["run", "--suite", suite, "--backend", "fake", "--tokenizer", "byte", "--out", str(tmp_path),
                 "--run-id", "r", "--no-progress", "--backend-opt", "mode=constant",
                 "--backend-opt", "text= 0123456789."])
    assert code == 0
    df = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert df["score"].tolist() == [0.0] * 5  # 0/5: every digit is in the output, no 7-digit value is
    for row in df.itertuples():
        assert len(row.target) == 1 and len(row.target[0]) == 7  # a list of one 7-digit value, not a string
        assert score(row.scorer, row.completion, row.target).value == row.score
    with pytest.raises(TypeError, match="bare string"):
        score("string_match_all", " 0123456789.", "7503775")
    with pytest.raises(TypeError, match="bare string"):
        score("first_int_match", " 1.", "12345")


def test_kind4_results_written_before_the_list_column_load_as_lists(tmp_path: Path) -> None:
    from evalctx.analysis import load_run

    from run_fixtures import write_run

    run_dir = write_run(tmp_path, "old", tasks=("niah_multivalue",), lengths=(4096,), depths=(0.5,), samples=2)
    df = pd.read_parquet(run_dir / "results.parquet")
    df["target"] = ["1111111|2222222", "3333333|4444444"]  # how older versions stored four-value answers
    df.to_parquet(run_dir / "results.parquet", index=False)
    loaded = load_run(run_dir)
    assert loaded["target"].tolist() == [["1111111", "2222222"], ["3333333", "4444444"]]
    assert score("string_match_all", " 1111111.", loaded["target"].iloc[0]).value == 0.5
