"""Plots, checked through the matplotlib objects (titles, tick labels, image and line data) and as PNG files."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from evalctx.analysis.runs import load_runs, summary  # noqa: E402
from evalctx.errors import UsageError  # noqa: E402
from evalctx.report import plots  # noqa: E402
from run_fixtures import write_run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OPTS = {"tasks": ("passkey", "niah_single"), "lengths": (4096, 8192, 16384), "depths": (0.0, 0.5, 1.0)}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("runs")
    return load_runs([write_run(root, "fp16", label="fp16", **OPTS),
                      write_run(root, "int8", label="int8kv", miss_from=8192, error_from=16384, latency_scale=1.5,
                                **OPTS)])


def test_heatmap(two_runs, tmp_path) -> None:
    path = tmp_path / "heat.png"
    fig = plots.heatmap(two_runs, "passkey", label="int8kv", path=path)
    ax = fig.axes[0]
    assert ax.get_title() == "int8kv (/engines/int8kv): passkey"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4K", "8K", "16K"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0%", "50%", "100%"]
    image = ax.images[0]
    data = np.ma.filled(image.get_array().astype(float), np.nan)
    cells = summary(two_runs[(two_runs["label"] == "int8kv") & (two_runs["task"] == "passkey")])
    expected = cells.pivot(index="depth", columns="context_length", values="accuracy").to_numpy()
    np.testing.assert_allclose(data, 100 * expected)  # percent
    assert np.isnan(data[:, 2]).all()  # 16K: every sample an error
    assert image.get_clim() == (0.0, 100.0)
    assert image.get_cmap().name.startswith("cividis")  # colour-blind safe, not red-yellow-green
    texts = [t.get_text() for t in ax.texts]
    n = cells.pivot(index="depth", columns="context_length", values="n").to_numpy()
    assert texts[0] == "100%\nn=20" and texts[2] == "error\nn=0" and len(texts) == 9
    assert texts[1] == f"{100 * expected[0, 1]:.0f}%\nn={int(n[0, 1])}"
    # Readable on every cell: white text on the dark (low) end of the map, black on the light end.
    colors = {t.get_text(): t.get_color() for t in ax.texts}
    assert colors["100%\nn=20"] == "black"
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_heatmap_says_why_a_cell_has_no_score(tmp_path) -> None:
    df = load_runs([write_run(tmp_path, "u", label="u", tasks=("passkey",), lengths=(4096, 8192), depths=(0.5,),
                              samples=3, unsupported_from=8192, base_accuracy=0.0)])
    texts = [t.get_text() for t in plots.heatmap(df, "passkey").axes[0].texts]
    assert texts == ["0%\nn=3", "unsupported\nn=0"]
    colors = [t.get_color() for t in plots.heatmap(df, "passkey").axes[0].texts]
    assert colors[0] == "white"  # 0% is cividis' darkest blue


def test_heatmaps_of_results_without_depths_have_one_row(two_runs) -> None:
    """A hand-made results file without a depth column loads with depth NaN: one row "n/a", not one per sample."""
    fp16 = two_runs[two_runs["label"] == "fp16"].assign(depth=float("nan"))
    for fig in (plots.heatmap(fp16, "passkey"), plots.difference_heatmap(fp16, fp16, "passkey")):
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["n/a"] and len(ax.texts) == 3
    assert [t.get_text() for t in plots.heatmap(fp16, "passkey").axes[0].texts] == ["100%\nn=60"] * 3


def test_difference_heatmap(two_runs, tmp_path) -> None:
    from evalctx.analysis.compare import compare

    fp16, int8 = (two_runs[two_runs["label"] == x] for x in ("fp16", "int8kv"))
    result = compare(fp16, int8)
    fig = plots.difference_heatmap(fp16, int8, "passkey", result=result, path=tmp_path / "d.png")
    ax = fig.axes[0]
    assert ax.get_title().startswith("passkey: int8kv − fp16")
    image = ax.images[0]
    data = np.ma.filled(image.get_array().astype(float), np.nan)
    acc = {label: summary(g[g["task"] == "passkey"]).pivot(index="depth", columns="context_length",
                                                           values="accuracy").to_numpy()
           for label, g in (("fp16", fp16), ("int8kv", int8))}
    np.testing.assert_allclose(data[:, :2], 100 * (acc["int8kv"] - acc["fp16"])[:, :2])
    assert np.isnan(data[:, 2]).all() and image.get_clim() == (-100.0, 100.0)
    assert image.get_cmap().name.startswith("RdBu")
    texts = np.array([t.get_text() for t in ax.texts]).reshape(3, 3)
    assert all(t.startswith("±0\n100→100%") for t in texts[:, 0])
    assert all(t == "no score\ncandidate" for t in texts[:, 2])
    # The gate's verdicts: 8K dropped from 20/20 to about 8/20 at each depth, significant after Holm.
    cells = result.table[(result.table["level"] == "cell") & (result.table["task"] == "passkey")]
    regressions = cells[cells["verdict"] == "regression"]
    assert len(regressions) >= 1 and set(regressions["context_length"]) == {8192}
    assert sum("▼" in t for t in texts[:, 1]) == len(regressions) and not any("▼" in t for t in texts[:, 0])
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG_MAGIC


def test_difference_heatmap_marks_cells_only_one_run_has(tmp_path) -> None:
    a = load_runs([write_run(tmp_path, "a", label="a", tasks=("passkey",), lengths=(4096, 8192), depths=(0.5,),
                             samples=2)])
    b = load_runs([write_run(tmp_path, "b", label="b", tasks=("passkey",), lengths=(8192, 16384), depths=(0.5,),
                             samples=2)])
    texts = [t.get_text() for t in plots.difference_heatmap(a, b, "passkey").axes[0].texts]
    assert texts == ["only in\nbaseline", "±0\n100→100%", "new in\ncandidate"]
    with pytest.raises(UsageError, match="no rows for task 'nope'"):
        plots.difference_heatmap(a, b, "nope")


def test_heatmap_needs_a_label_when_several(two_runs) -> None:
    with pytest.raises(UsageError, match="several labels"):
        plots.heatmap(two_runs, "passkey")
    with pytest.raises(UsageError, match="no rows for task"):
        plots.heatmap(two_runs, "nope", label="fp16")


def test_accuracy_vs_length(two_runs, tmp_path) -> None:
    fig = plots.accuracy_vs_length(two_runs, "passkey", path=tmp_path / "acc.png")
    ax = fig.axes[0]
    assert ax.get_title() == "passkey: accuracy vs context length"
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4K", "8K", "16K"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    fp16, int8 = lines["fp16"], lines["int8kv"]
    assert list(fp16.get_xdata()) == [4096, 8192, 16384] and list(fp16.get_ydata()) == [1.0, 1.0, 1.0]
    y = np.asarray(int8.get_ydata(), dtype=float)
    assert y[0] == 1.0 and 0.2 < y[1] < 0.6 and np.isnan(y[2])
    # Effective length markers: fp16 passes everywhere (≥16K: the longest tested), int8kv only at 4K.
    assert list(lines["effective ≥16K"].get_xdata()) == [16384, 16384]
    assert list(lines["effective 4K"].get_xdata()) == [4096, 4096]
    assert lines["threshold 85.6%"].get_ydata()[0] == pytest.approx(0.856)
    assert [t.get_text() for t in ax.get_yticklabels()][1:-1] == ["0%", "20%", "40%", "60%", "80%", "100%"]
    assert len(ax.collections) >= 2  # the CI bands (and error bar collections)
    assert (tmp_path / "acc.png").read_bytes()[:8] == PNG_MAGIC


def test_latency_vs_length(two_runs) -> None:
    fig = plots.latency_vs_length(two_runs)
    assert [ax.get_title() for ax in fig.axes] == ["TTFT vs length", "latency vs length", "prefill tokens/s vs length"]
    # The caption says what is pooled: scored samples of both tasks, all depths.
    n_ok = int((two_runs["status"] == "ok").sum())
    assert fig.get_suptitle() == (f"Medians per length over {n_ok} scored samples (tasks niah_single, passkey, "
                                  "all depths pooled).")
    ttft_ax = fig.axes[0]
    assert ttft_ax.get_xscale() == "log" and ttft_ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ttft_ax.get_lines()}
    ok = two_runs[(two_runs["status"] == "ok") & (two_runs["label"] == "fp16")]
    np.testing.assert_allclose(lines["fp16"].get_ydata(), ok.groupby("context_length")["ttft_s"].median())
    assert list(lines["int8kv"].get_xdata()) == [4096, 8192]  # no timings where every sample failed
    ratio = lines["int8kv"].get_ydata()[0] / lines["fp16"].get_ydata()[0]
    assert ratio == pytest.approx(1.5, rel=0.02)


def test_latency_ticks_read_as_plain_units(two_runs) -> None:
    """TTFT spans 0.1-0.5 s and prefill 27K-47K tokens/s: ticks at 1-2-3-5 steps in ms/s or K, no 10^k mathtext,
    every line inside them."""
    fig = plots.latency_vs_length(two_runs)
    for ax, unit in zip(fig.axes, ("s", "s", "")):
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert len(labels) >= 2 and not any("$" in t or "^" in t for t in labels), labels
        assert all(t.endswith(unit) for t in labels)
        lo, hi = ax.get_ylim()
        ys = np.concatenate([line.get_ydata() for line in ax.get_lines()])
        assert lo <= ys.min() and ys.max() <= hi
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["100 ms", "200 ms", "300 ms", "500 ms"]
    assert [t.get_text() for t in fig.axes[2].get_yticklabels()] == ["20K", "30K", "50K"]  # 27K-47K


@pytest.mark.parametrize(("value", "seconds", "count"), [(2e-5, "20 µs", "2e-05"), (0.05, "50 ms", "0.05"),
                                                         (3.0, "3 s", "3"), (2000.0, "2000 s", "2K"),
                                                         (1.5e6, "1.5e+06 s", "1.5M")])
def test_tick_texts(value: float, seconds: str, count: str) -> None:
    from evalctx.report.figures import count_text, seconds_text

    assert seconds_text(value) == seconds and count_text(value) == count


def test_latency_leaves_out_rows_that_reused_cached_prompt_tokens(two_runs) -> None:
    df = two_runs.copy()
    warm = (df["label"] == "fp16") & (df["task"] == "passkey") & (df["status"] == "ok")
    df["n_cached_prompt_tokens"] = np.where(warm, 4000, 0)
    df.loc[warm, "ttft_s"] = 1e-4  # a prefix-cache hit: no real prefill
    fig = plots.latency_vs_length(df)
    assert f"{int(warm.sum())} samples that reused cached prompt tokens" in fig.get_suptitle()
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    cold = df[(df["label"] == "fp16") & (df["task"] == "niah_single") & (df["status"] == "ok")]
    np.testing.assert_allclose(lines["fp16"].get_ydata(), cold.groupby("context_length")["ttft_s"].median())


def test_trend(two_runs, tmp_path) -> None:
    s = summary(two_runs)
    nights = []
    for day in (1, 2, 3):
        for label in ("fp16", "int8kv"):
            nights.append(s[s["label"] == label].assign(run_id=f"n{day}-{label}", date=f"2026-01-0{day}T02:00:00Z",
                                                        passed=(label == "fp16" or day < 3)))
    history = pd.concat(nights)
    fig = plots.trend(history, path=tmp_path / "trend.png")
    acc_ax, lat_ax = fig.axes
    assert acc_ax.get_title() == "accuracy over nightly runs"
    assert lat_ax.get_title() == "median latency over nightly runs"
    lines = {line.get_label(): line for line in acc_ax.get_lines()}
    assert len(lines["fp16"].get_xdata()) == 3
    assert list(lines["fp16"].get_ydata()) == [1.0, 1.0, 1.0]
    failed = [c for c in acc_ax.collections if c.get_label() == "int8kv: gate failed"]
    assert len(failed) == 1 and len(failed[0].get_offsets()) == 1
    assert (tmp_path / "trend.png").read_bytes()[:8] == PNG_MAGIC


def test_missing_matplotlib_is_a_usage_error(two_runs, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError, match=r"matplotlib is not installed: pip install 'evalctx\[plot\]'"):
        plots.heatmap(two_runs, "passkey", label="fp16")
