"""RULER's headline: the per-length average over a suite's tasks and the effective length on it."""

from __future__ import annotations

import math

import pandas as pd
import pytest

import evalctx
import evalctx.results
from evalctx.analysis import runs as analysis
from evalctx.results.summary import summarize
from evalctx.analysis.table import format_summary


def rows(task: str, length: int, hits: int, n: int, errors: int = 0, label: str = "m") -> list[dict]:
    """``n`` scored samples of which ``hits`` are right, plus ``errors`` error rows, over two depths."""
    out = [{"label": label, "task": task, "context_length": length, "depth": float(i % 2), "status": "ok",
            "score": 1.0 if i < hits else 0.0, "latency_s": 0.1} for i in range(n)]
    out += [{"label": label, "task": task, "context_length": length, "depth": 0.0, "status": "error",
             "score": None, "latency_s": None} for _ in range(errors)]
    return out


def frame(*parts: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([r for p in parts for r in p])


def test_each_task_weighs_the_same_whatever_its_sample_count() -> None:
    """RULER averages the per-task scores: 100% on 100 samples and 50% on 10 average to 75%, not the pooled
    105/110 = 95.5%."""
    df = frame(rows("a", 4096, 100, 100), rows("b", 4096, 5, 10))
    avg = analysis.suite_average(df)
    assert avg.to_dict("records") == [{"label": "m", "context_length": 4096, "accuracy": 0.75, "n_tasks": 2,
                                       "missing": "", "not_run": ""}]
    # a summary (n and accuracy per cell) gives the same average
    assert analysis.suite_average(summarize(df, by=["label", "task", "context_length", "depth"]))[
        "accuracy"].tolist() == [0.75]


def test_a_length_some_task_lacks_has_no_average() -> None:
    """b was not run at 8K, c only errored there: averaging the rest would compare other tasks than at 4K."""
    df = frame(rows("a", 4096, 9, 10), rows("b", 4096, 8, 10), rows("c", 4096, 10, 10),
               rows("a", 8192, 9, 10), rows("c", 8192, 0, 0, errors=5))
    avg = analysis.suite_average(df).set_index("context_length")
    assert avg.loc[4096, "accuracy"] == pytest.approx(0.9) and avg.loc[4096, "missing"] == ""
    assert math.isnan(avg.loc[8192, "accuracy"]) and avg.loc[8192, "missing"] == "b, c"
    assert avg.loc[8192, "not_run"] == "b" and avg.loc[4096, "not_run"] == ""
    assert (avg["n_tasks"] == 3).all()


def test_a_length_some_task_is_not_run_at_is_skipped_by_the_effective_length() -> None:
    """passkey at 512-2K and kv_retrieval at 1K-2K, both 100%: the effective length used to read "<512" (the
    missing 512 average failed), as if the model failed everywhere. A length a task only errored at still fails."""
    df = frame(rows("passkey", 512, 10, 10), rows("passkey", 1024, 10, 10), rows("passkey", 2048, 10, 10),
               rows("kv", 1024, 10, 10), rows("kv", 2048, 10, 10))
    assert analysis.suite_effective_length(df) == {"m": 2048}
    assert analysis.suite_average_table(df)["effective (>= 0.856)"].tolist() == [">=2K"]
    text = format_summary(df.drop(columns="label"))
    assert "    512 |     -  (not run: kv)" in text
    assert ("effective length (average >= 85.6% here and at every shorter length; lengths some task is not run "
            "at are skipped): >=2K") in text
    errored = frame(rows("passkey", 512, 10, 10), rows("kv", 512, 0, 0, errors=3),
                    rows("passkey", 1024, 10, 10), rows("kv", 1024, 10, 10))
    assert analysis.suite_effective_length(errored) == {"m": None}
    assert "   512 |     -  (no scored sample of: kv)" in format_summary(errored.drop(columns="label"))
    disjoint = frame(rows("a", 512, 10, 10), rows("b", 1024, 10, 10))
    assert analysis.suite_effective_length(disjoint) == {"m": None}
    assert analysis.suite_average_table(disjoint)["effective (>= 0.856)"].tolist() == [
        "n/a (no length that every task ran at)"]


def test_effective_length_on_the_average() -> None:
    """RULER: the longest length whose average, and every shorter one's, is >= 85.6%."""
    df = frame(rows("a", 4096, 10, 10), rows("b", 4096, 9, 10),     # 95%
               rows("a", 8192, 9, 10), rows("b", 8192, 8, 10),      # 85%: below
               rows("a", 16384, 10, 10), rows("b", 16384, 10, 10))  # 100% again: does not count
    assert analysis.suite_effective_length(df) == {"m": 4096}
    table = analysis.suite_average_table(df)
    assert table.to_dict("records") == [{"label": "m", "tasks": 2, "4K": "95.0", "8K": "85.0", "16K": "100.0",
                                         "effective (>= 0.856)": "4K"}]
    low = frame(rows("a", 4096, 5, 10), rows("b", 4096, 5, 10))
    assert analysis.suite_effective_length(low) == {"m": None}
    assert analysis.suite_average_table(low)["effective (>= 0.856)"].tolist() == ["<4K"]


def test_labels_are_averaged_apart() -> None:
    df = frame(rows("a", 4096, 10, 10, label="x"), rows("b", 4096, 10, 10, label="x"),
               rows("a", 4096, 0, 10, label="y"), rows("b", 4096, 10, 10, label="y"))
    assert analysis.suite_average(df).set_index("label")["accuracy"].to_dict() == {"x": 1.0, "y": 0.5}


def test_the_run_table_prints_the_average_only_for_several_tasks() -> None:
    df = frame(rows("a", 4096, 10, 10), rows("b", 4096, 8, 10), rows("a", 8192, 7, 10))
    text = format_summary(df.drop(columns="label"))
    assert "average over the 2 tasks, as RULER reports it" in text
    assert "   4096 |  90.0" in text and "   8192 |     -  (not run: b)" in text
    assert ("effective length (average >= 85.6% here and at every shorter length; lengths some task is not run "
            "at are skipped): >=4K") in text
    assert "average over" not in format_summary(frame(rows("a", 4096, 10, 10)))


def test_public_api() -> None:
    assert evalctx.suite_average is analysis.suite_average
    assert evalctx.suite_effective_length is analysis.suite_effective_length
    # the analysis package names them too; results (the layer below analysis) no longer re-exports them
    import evalctx.analysis as pkg

    assert pkg.suite_average is analysis.suite_average and pkg.suite_average_table is analysis.suite_average_table
    with pytest.raises(AttributeError):
        evalctx.results.suite_average  # noqa: B018
