"""Latency tables, plots and the gate time cold rows only: a row whose prompt came partly from a KV cache
(n_cached_prompt_tokens > 0, or the flag kv_cache_reuse) timed its suffix's prefill, not its prompt's."""

from __future__ import annotations

import pandas as pd
import pytest
from run_fixtures import make_rows

from evalctx.analysis.compare import compare
from evalctx.results.summary import summarize, warm_rows


def _rows(cached: list[int | None], latencies: list[float], flags: list[list[str]] | None = None) -> pd.DataFrame:
    rows = make_rows("r", tasks=("passkey",), lengths=(4096,), depths=(0.5,), samples=len(cached))
    df = pd.DataFrame(rows)
    df["n_cached_prompt_tokens"] = cached
    df["latency_s"] = latencies
    df["ttft_s"] = [x / 2 for x in latencies]
    df["prefill_tokens_per_s"] = 4096 / df["ttft_s"]
    df["flags"] = flags or [[] for _ in cached]
    return df


def test_warm_rows() -> None:
    df = _rows([0, 2048, None, 0], [1, 1, 1, 1], flags=[[], [], [], ["kv_cache_reuse"]])
    assert warm_rows(df).tolist() == [False, True, False, True]  # unknown counts as cold; the flag as warm
    assert not warm_rows(df.drop(columns=["n_cached_prompt_tokens", "flags"])).any()  # runs older than the field


def test_summary_times_cold_rows_and_counts_the_rest() -> None:
    s = summarize(_rows([0, 3072, 3584, 0, None], [2.0, 0.2, 0.1, 4.0, 3.0])).iloc[0]
    assert s["n"] == 5 and s["n_warm"] == 2
    assert s["latency_s_p50"] == 3.0 and s["ttft_s_p50"] == 1.5  # median of 2, 4, 3; pooled it would be 2.0
    assert s["prefill_tokens_per_s_p50"] == pytest.approx(4096 / 1.5)
    warm = summarize(_rows([1024, 2048], [0.5, 0.3])).iloc[0]
    assert warm["n"] == 2 and warm["n_warm"] == 2 and pd.isna(warm["latency_s_p50"]) and pd.isna(warm["ttft_s_p50"])


def test_gate_compares_cold_latencies_only() -> None:
    """The candidate's cold prefills got 2x slower; its warm rows (suffix prefills) are fast. Pooled, the medians
    would hide the regression (or, another order, invent one)."""
    base = _rows([0] * 6, [1.0] * 6)
    cand = _rows([0, 0, 0, 3000, 3000, 3000], [2.0, 2.0, 2.0, 0.1, 0.1, 0.1])
    res = compare(base, cand, min_samples=3, pooled=False)
    row = res.table.iloc[0]
    assert row["verdict"] == "latency_regression" and row["latency_ratio"] == pytest.approx(2.0)
    same = compare(base, _rows([0, 0, 0, 3000, 3000, 3000], [1.0, 1.0, 1.0, 0.1, 0.1, 0.1]), min_samples=3,
                   pooled=False)
    assert same.table.iloc[0]["verdict"] == "ok" and same.table.iloc[0]["latency_ratio"] == pytest.approx(1.0)


def test_latency_plot_says_which_rows_it_pools() -> None:
    pytest.importorskip("matplotlib")
    from evalctx.report.plots import latency_vs_length

    fig = latency_vs_length(_rows([0, 0, 2048], [1.0, 1.2, 0.1]))
    assert all("cold rows; 1 warm rows left out" in ax.get_title() for ax in fig.axes)
    fig = latency_vs_length(_rows([2048, 1024], [0.1, 0.2]))
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts and all(t.startswith("no cold row: 2 rows had") for t in texts)
    fig = latency_vs_length(_rows([0, 0], [1.0, 1.2]))
    assert [ax.get_title() for ax in fig.axes][0] == "TTFT vs length"


@pytest.mark.parametrize("cached, rate", [(0, 4096 / 0.5), (3072, 1024 / 0.5), (None, 4096 / 0.5)])
def test_a_warm_rows_prefill_rate_counts_the_tokens_it_computed(cached: int | None, rate: float) -> None:
    """A warm row's TTFT timed its 1024-token suffix: 4096 tokens over it would read as a 4x faster prefill."""
    from evalctx.records import GenerationResult, Sample
    from evalctx.run.rows import make_record

    sample = Sample(id="s", task="passkey", context_length=4096, depth=0.75, seed=0, prompt="p",
                    prompt_ids=[1] * 4096, target=["7"], needle_token_index=3072, max_new_tokens=4)
    res = GenerationResult(text=" 7.", n_prompt_tokens=4096, n_output_tokens=2, latency_s=0.75, ttft_s=0.5,
                           finish_reason="stop", n_cached_prompt_tokens=cached)
    assert make_record("r", sample, res, 0, {})["prefill_tokens_per_s"] == pytest.approx(rate)
