"""Plots, checked through the matplotlib objects (titles, tick labels, image and line data) and as PNG files."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from evalctx.analysis import load_runs, summary  # noqa: E402
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
    expected = summary(two_runs[(two_runs["label"] == "int8kv") & (two_runs["task"] == "passkey")]) \
        .pivot(index="depth", columns="context_length", values="accuracy").to_numpy()
    np.testing.assert_allclose(data, expected)
    assert np.isnan(data[:, 2]).all()  # 16K: every sample an error
    assert image.get_clim() == (0.0, 1.0)
    cmap = image.get_cmap()
    assert cmap(0.0)[:3] == pytest.approx((0xF0 / 255, 0x49 / 255, 0x6E / 255), abs=1e-2)
    assert cmap(1.0)[:3] == pytest.approx((0x0C / 255, 0xD7 / 255, 0x9F / 255), abs=1e-2)
    texts = [t.get_text() for t in ax.texts]
    assert texts[0] == "1.00" and texts[2] == "err" and len(texts) == 9
    assert path.read_bytes()[:8] == PNG_MAGIC


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
    # Effective length markers: fp16 passes everywhere (16K), int8kv only at 4K.
    assert list(lines["effective 16K"].get_xdata()) == [16384, 16384]
    assert list(lines["effective 4K"].get_xdata()) == [4096, 4096]
    assert lines["threshold 0.856"].get_ydata()[0] == pytest.approx(0.856)
    assert len(ax.collections) >= 2  # the CI bands (and error bar collections)
    assert (tmp_path / "acc.png").read_bytes()[:8] == PNG_MAGIC


def test_latency_vs_length(two_runs) -> None:
    fig = plots.latency_vs_length(two_runs)
    assert [ax.get_title() for ax in fig.axes] == ["TTFT (s) vs length", "latency (s) vs length",
                                                   "prefill tokens/s vs length"]
    ttft_ax = fig.axes[0]
    assert ttft_ax.get_xscale() == "log" and ttft_ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ttft_ax.get_lines()}
    ok = two_runs[(two_runs["status"] == "ok") & (two_runs["label"] == "fp16")]
    np.testing.assert_allclose(lines["fp16"].get_ydata(), ok.groupby("context_length")["ttft_s"].median())
    assert list(lines["int8kv"].get_xdata()) == [4096, 8192]  # no timings where every sample failed
    ratio = lines["int8kv"].get_ydata()[0] / lines["fp16"].get_ydata()[0]
    assert ratio == pytest.approx(1.5, rel=0.02)


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
