"""Plots of a results DataFrame: accuracy and latency vs length, nightly trends; the depth x length heatmaps are
in :mod:`evalctx.report.heatmaps` (re-exported here).

Every function returns a matplotlib Figure and, given ``path``, also writes it as PNG (see
:mod:`evalctx.report.figures` for the canvas, the colours and the axes). matplotlib is imported only inside the
functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from evalctx.analysis.runs import RULER_THRESHOLD, _eff_text, effective_length
from evalctx.errors import UsageError
from evalctx.report.figures import (LEGEND_CHARS, count_text, figure, labels_of, line_style, log2_length_axis, mpl_text,
                                    readable_log_y, save, seconds_text, select_task)
from evalctx.report.heatmaps import difference_heatmap, heatmap
from evalctx.results.summary import summarize, warm_rows

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["accuracy_vs_length", "difference_heatmap", "heatmap", "latency_vs_length", "trend"]


def _length_summary(df: pd.DataFrame) -> pd.DataFrame:
    data = df if "label" in df.columns else df.assign(label="")
    return summarize(data, by=["label", "context_length"])


def accuracy_vs_length(df: pd.DataFrame, task: str, path: str | Path | None = None,
                       threshold: float = RULER_THRESHOLD) -> "Figure":
    """Accuracy (pooled over depths, y in percent) vs length, one line per label, Wilson 95% CI as error bars and
    a band; a dashed vertical line marks each label's effective length, a dotted line the threshold."""
    from matplotlib.ticker import PercentFormatter

    sel = select_task(df, task)
    s = _length_summary(sel)
    eff = effective_length(sel if "label" in sel.columns else sel.assign(label=""), threshold=threshold)
    lengths = sorted(int(x) for x in s["context_length"].unique())
    fig, ax = figure(7.5, 4.2)
    for i, label in enumerate(labels_of(sel)):
        g = s[s["label"] == label].sort_values("context_length")
        style = line_style(i)
        x, y = g["context_length"].to_numpy(), g["accuracy"].to_numpy(dtype=float)
        lo, hi = g["ci_low"].to_numpy(dtype=float), g["ci_high"].to_numpy(dtype=float)
        # Clipped at 0: at accuracy 1.0 the Wilson bound can be 1 - 1e-16, a "negative" error bar to matplotlib.
        yerr = [(y - lo).clip(min=0.0), (hi - y).clip(min=0.0)]
        ax.plot(x, y, **style, label=mpl_text(label or task, LEGEND_CHARS))
        ax.errorbar(x, y, yerr=yerr, fmt="none", capsize=3, color=style["color"])
        ax.fill_between(x, lo, hi, color=style["color"], alpha=0.15, linewidth=0)
        e = eff.get((label, task))
        if e is not None:  # "≥16K" when the longest length tested still passes (RULER's notation)
            text = _eff_text(e, int(x.min()), int(x.max())).replace(">=", "≥")
            ax.axvline(e, color=style["color"], linestyle="--", linewidth=1, label=f"effective {text}")
    ax.axhline(threshold, color="grey", linestyle=":", linewidth=1, label=f"threshold {100 * threshold:g}%")
    log2_length_axis(ax, lengths)
    ax.set_ylim(-0.03, 1.03)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.set_ylabel("accuracy (Wilson 95% CI)")
    ax.set_title(mpl_text(f"{task}: accuracy vs context length"))
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, alpha=0.3)
    save(fig, path)
    return fig


# (column, panel name, tick text): seconds in s/ms/µs, rates with K/M.
LATENCY_PANELS = (("ttft_s", "TTFT", seconds_text), ("latency_s", "latency", seconds_text),
                  ("prefill_tokens_per_s", "prefill tokens/s", count_text))


def latency_rows(df: pd.DataFrame, task: str | None = None) -> tuple[pd.DataFrame, str]:
    """The rows the latency plot takes and one sentence saying what they are: the scored samples of ``task``
    (default: every task), all depths pooled, leaving out samples whose prompt came partly from a KV or prefix
    cache (``n_cached_prompt_tokens`` > 0): their TTFT is not a cold prefill of the whole prompt."""
    sel = select_task(df, task)
    sel = sel[sel["status"] == "ok"] if "status" in sel.columns else sel
    tasks = sorted(str(t) for t in sel["task"].unique())
    warm = warm_rows(sel)  # n_cached_prompt_tokens > 0, or the trtllm flag kv_cache_reuse
    n_warm = int(warm.sum())
    sel = sel[~warm]
    cache_note = (f"; {n_warm} samples that reused cached prompt tokens left out (cold rows only), as their TTFT is "
                  "not a cold prefill") if n_warm else ""
    what = (f"Medians per length over {len(sel)} scored samples ("
            + (f"task {tasks[0]}" if len(tasks) == 1 else f"tasks {', '.join(tasks)}")
            + ", all depths pooled)" + cache_note)
    return sel, what + "."


def latency_vs_length(df: pd.DataFrame, task: str | None = None, path: str | Path | None = None) -> "Figure":
    """Median TTFT, end-to-end latency and prefill throughput vs length, log-log, one line per label, over the
    rows :func:`latency_rows` picks (its sentence is the figure's caption). The y ticks read "20 ms", "1.5 s",
    "40K" rather than powers of ten."""
    import textwrap

    sel, what = latency_rows(df, task)
    scored = select_task(df, task)
    scored = scored[scored["status"] == "ok"] if "status" in scored.columns else scored
    n_warm = int(warm_rows(scored).sum())
    if "label" not in sel.columns:
        sel = sel.assign(label="")
    fig, axes = figure(13.0, 4.3, ncols=len(LATENCY_PANELS))
    fig.suptitle(textwrap.fill(mpl_text(what), 170), fontsize=9)
    lengths = sorted(int(x) for x in sel["context_length"].unique())
    for ax, (col, name, tick_text) in zip(axes, LATENCY_PANELS):
        data = sel[["label", "context_length", col]].dropna() if col in sel.columns else pd.DataFrame()
        if data.empty:
            why = f"no cold row: {n_warm} rows had\nprompt tokens from a KV cache" if n_warm else "not measured"
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
        else:
            med = data.groupby(["label", "context_length"])[col].median().reset_index()
            for i, label in enumerate(labels_of(sel)):
                g = med[med["label"] == label]
                if not g.empty:
                    ax.plot(g["context_length"], g[col], **line_style(i), label=mpl_text(label or "run", LEGEND_CHARS))
            readable_log_y(ax, tick_text)
            ax.legend(fontsize=8)
        if lengths:
            log2_length_axis(ax, lengths)
        ax.set_title(f"{name} vs length" + (f"\n(cold rows; {n_warm} warm rows left out)" if n_warm else ""))
        ax.set_ylabel(f"median {name}")
        ax.grid(True, which="major", alpha=0.3)
    save(fig, path)
    return fig


def history_points(history_df: pd.DataFrame) -> pd.DataFrame:
    """One row per gated run: date, label, passed, pooled accuracy (weighted by n) and median cell latency."""
    h = history_df.copy()
    h["date"] = pd.to_datetime(h["date"], utc=True, errors="coerce")
    h["_succ"] = pd.to_numeric(h["accuracy"], errors="coerce").fillna(0.0) * pd.to_numeric(h["n"], errors="coerce")
    h["latency_s_p50"] = pd.to_numeric(h.get("latency_s_p50"), errors="coerce")
    keys = ["run_id", "label", "date", "passed"]
    g = h.groupby(keys, sort=False, dropna=False)
    out = pd.DataFrame({"n": g["n"].sum(), "succ": g["_succ"].sum(), "latency_s_p50": g["latency_s_p50"].median()})
    out = out.reset_index()
    out["accuracy"] = out["succ"] / out["n"].where(out["n"] > 0)
    out["passed"] = out["passed"].astype(str).str.lower().isin(["true", "1", "yes"])
    return out.drop(columns="succ").sort_values("date").reset_index(drop=True)


def trend(history_df: pd.DataFrame, path: str | Path | None = None) -> "Figure":
    """Accuracy and median latency over the nightly runs in history/summary.csv (x = run date), one line per
    label; failed gates are drawn as black crosses."""
    pts = history_points(history_df)
    if pts.empty:
        raise UsageError("the history has no runs to plot")
    fig, (ax_acc, ax_lat) = figure(11.0, 3.8, ncols=2)
    for i, label in enumerate(sorted(pts["label"].astype(str).unique())):
        g = pts[pts["label"].astype(str) == label]
        for ax, col in ((ax_acc, "accuracy"), (ax_lat, "latency_s_p50")):
            ax.plot(g["date"], g[col], **line_style(i), label=mpl_text(label, LEGEND_CHARS))
            bad = g[~g["passed"]]
            if not bad.empty:
                ax.scatter(bad["date"], bad[col], marker="X", s=90, color="black", zorder=3,
                           label=mpl_text(label, LEGEND_CHARS) + ": gate failed")
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    ax_acc.set_ylim(-0.03, 1.03)
    ax_acc.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax_acc.set_title("accuracy over nightly runs")
    ax_acc.set_ylabel("accuracy (all cells)")
    # From 0: scheduler jitter of a few ms must not look like a doubling.
    top = pd.to_numeric(pts["latency_s_p50"], errors="coerce").max()
    if top == top and top > 0:  # not NaN: some run has timings
        ax_lat.set_ylim(0.0, 1.1 * top)
    ax_lat.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: seconds_text(v) if v > 0 else "0"))
    ax_lat.set_title("median latency over nightly runs")
    ax_lat.set_ylabel("median of cell p50 latency")

    for ax in (ax_acc, ax_lat):
        locator = AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.set_xlabel("run date")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelrotation=30)
    save(fig, path)
    return fig
