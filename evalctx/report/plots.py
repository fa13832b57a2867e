"""Plots of a results DataFrame: the depth x length heatmap, accuracy and latency vs length, nightly trends.

Every function returns a matplotlib Figure and, given ``path``, also writes it as PNG. Figures are built on the
Agg canvas directly instead of through pyplot: that works on a headless node (no DISPLAY), never touches the
caller's pyplot backend or state (a notebook keeps its inline backend), and does not leak figures into pyplot's
registry when a report draws dozens of them. matplotlib is imported only here, inside the functions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from evalctx.analysis import RULER_THRESHOLD, effective_length, length_label
from evalctx.errors import UsageError
from evalctx.results.summary import summarize, warm_rows

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

# gkamradt's LLMTest_NeedleInAHaystack heatmap colours: red (missed) -> yellow -> green (found).
HEATMAP_COLORS = ["#F0496E", "#EBB839", "#0CD79F"]


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("matplotlib is not installed: pip install 'evalctx[plot]'") from None


def _figure(width: float, height: float, ncols: int = 1) -> tuple["Figure", Any]:
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: PNG output with no display
    axes = fig.subplots(1, ncols, squeeze=True)
    return fig, axes


def _text(value: Any) -> str:
    """A label, task or model name as matplotlib text that shows it as typed: ``$`` escaped (mathtext would parse
    "$" pairs as formulas, and fail on an odd count), and a leading ``_`` kept off the legend's hide-this marker."""
    text = str(value).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _save(fig: "Figure", path: str | Path | None) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=110)


def _select(df: pd.DataFrame, task: str | None) -> pd.DataFrame:
    if task is None:
        return df
    sel = df[df["task"] == task]
    if sel.empty:
        raise UsageError(f"no rows for task {task!r}; tasks here: {sorted(df['task'].unique())}")
    return sel


def _labels(df: pd.DataFrame) -> list[str]:
    return sorted(df["label"].astype(str).unique()) if "label" in df.columns else [""]


def _log2_length_axis(ax: Any, lengths: list[int]) -> None:
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [length_label(n) for n in lengths])
    # Only the x minor ticks go: a log y axis spanning less than a decade is labelled by its minor ticks.
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("context length (tokens)")


def heatmap(df: pd.DataFrame, task: str, label: str | None = None, path: str | Path | None = None) -> "Figure":
    """Accuracy per (depth, context length) cell: depth 0% (start of the context) on top, as in gkamradt's chart.
    Cells with no scored sample (all errors) are grey and marked "err"."""
    _require_matplotlib()
    from matplotlib.colors import LinearSegmentedColormap

    sel = _select(df, task)
    labels = _labels(sel)
    if label is None and len(labels) > 1:
        raise UsageError(f"several labels in the data ({', '.join(labels)}): pass label=")
    label = labels[0] if label is None else label
    if "label" in sel.columns:
        sel = sel[sel["label"].astype(str) == label]
        if sel.empty:
            raise UsageError(f"no rows for label {label!r} and task {task!r}")
    grid = summarize(sel, by=["depth", "context_length"]).pivot(index="depth", columns="context_length",
                                                                 values="accuracy")
    grid = grid.sort_index().sort_index(axis=1)
    lengths, depths = [int(c) for c in grid.columns], [float(d) for d in grid.index]

    # At least 5 in wide so the title (model and task) fits even for one or two lengths.
    fig, ax = _figure(max(5.0, 1.2 + 0.9 * len(lengths)), max(2.6, 1.2 + 0.42 * len(depths)))
    cmap = LinearSegmentedColormap.from_list("gkamradt", HEATMAP_COLORS).with_extremes(bad="#cccccc")
    values = grid.to_numpy(dtype=float)
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="accuracy", fraction=0.05)
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{round(d * 100, 1):g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            v = values[i, j]
            ax.text(j, i, "err" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="black")
    model = ""
    if "model" in sel.columns and sel["model"].notna().any():
        m = str(sel["model"].dropna().iloc[0])
        model = f" ({m})" if m != label else ""
    ax.set_title(_text(f"{label}{model}: {task}"))
    _save(fig, path)
    return fig


def _length_summary(df: pd.DataFrame) -> pd.DataFrame:
    data = df if "label" in df.columns else df.assign(label="")
    return summarize(data, by=["label", "context_length"])


def accuracy_vs_length(df: pd.DataFrame, task: str, path: str | Path | None = None,
                       threshold: float = RULER_THRESHOLD) -> "Figure":
    """Accuracy (pooled over depths) vs length, one line per label, Wilson 95% CI as error bars and a band; a
    dashed vertical line marks each label's effective length, a dotted line the threshold."""
    sel = _select(df, task)
    s = _length_summary(sel)
    eff = effective_length(sel if "label" in sel.columns else sel.assign(label=""), threshold=threshold)
    lengths = sorted(int(x) for x in s["context_length"].unique())
    fig, ax = _figure(7.5, 4.2)
    for i, label in enumerate(_labels(sel)):
        g = s[s["label"] == label].sort_values("context_length")
        color = f"C{i % 10}"
        x, y = g["context_length"].to_numpy(), g["accuracy"].to_numpy(dtype=float)
        lo, hi = g["ci_low"].to_numpy(dtype=float), g["ci_high"].to_numpy(dtype=float)
        # Clipped at 0: at accuracy 1.0 the Wilson bound can be 1 - 1e-16, a "negative" error bar to matplotlib.
        yerr = [(y - lo).clip(min=0.0), (hi - y).clip(min=0.0)]
        ax.plot(x, y, marker="o", color=color, label=_text(label or task))
        ax.errorbar(x, y, yerr=yerr, fmt="none", capsize=3, color=color)
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
        e = eff.get((label, task))
        if e is not None:
            ax.axvline(e, color=color, linestyle="--", linewidth=1, label=f"effective {length_label(e)}")
    ax.axhline(threshold, color="grey", linestyle=":", linewidth=1, label=f"threshold {threshold:g}")
    _log2_length_axis(ax, lengths)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("accuracy (Wilson 95% CI)")
    ax.set_title(_text(f"{task}: accuracy vs context length"))
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, alpha=0.3)
    _save(fig, path)
    return fig


LATENCY_PANELS = (("ttft_s", "TTFT (s)"), ("latency_s", "latency (s)"), ("prefill_tokens_per_s", "prefill tokens/s"))


def latency_vs_length(df: pd.DataFrame, task: str | None = None, path: str | Path | None = None) -> "Figure":
    """Median TTFT, end-to-end latency and prefill throughput of cold scored samples vs length, log-log, one line
    per label. All tasks are pooled unless ``task`` is given (prefill dominates at long context, whatever the
    task). Rows whose prompt came partly from a KV cache are left out (results.summary.warm_rows) and the title
    says how many."""
    sel = _select(df, task)
    sel = sel[sel["status"] == "ok"] if "status" in sel.columns else sel
    warm = warm_rows(sel)
    n_warm = int(warm.sum())
    sel = sel[~warm]
    if "label" not in sel.columns:
        sel = sel.assign(label="")
    fig, axes = _figure(13.0, 4.0, ncols=len(LATENCY_PANELS))
    lengths = sorted(int(x) for x in sel["context_length"].unique())
    for ax, (col, name) in zip(axes, LATENCY_PANELS):
        data = sel[["label", "context_length", col]].dropna() if col in sel.columns else pd.DataFrame()
        if data.empty:
            why = f"no cold row: {n_warm} rows had\nprompt tokens from a KV cache" if n_warm else "not measured"
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
        else:
            med = data.groupby(["label", "context_length"])[col].median().reset_index()
            for i, label in enumerate(_labels(sel)):
                g = med[med["label"] == label]
                if not g.empty:
                    ax.plot(g["context_length"], g[col], marker="o", color=f"C{i % 10}",
                            label=_text(label or "run"))
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        if lengths:
            _log2_length_axis(ax, lengths)
        ax.set_title(f"{name} vs length" + (f"\n(cold rows; {n_warm} warm rows left out)" if n_warm else ""))
        ax.set_ylabel(f"median {name}")
        ax.grid(True, which="both", alpha=0.3)
    _save(fig, path)
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
    label; failed gates are drawn as red crosses."""
    pts = history_points(history_df)
    if pts.empty:
        raise UsageError("the history has no runs to plot")
    fig, (ax_acc, ax_lat) = _figure(11.0, 3.8, ncols=2)
    for i, label in enumerate(sorted(pts["label"].astype(str).unique())):
        g = pts[pts["label"].astype(str) == label]
        color = f"C{i % 10}"
        for ax, col in ((ax_acc, "accuracy"), (ax_lat, "latency_s_p50")):
            ax.plot(g["date"], g[col], marker="o", color=color, label=_text(label))
            bad = g[~g["passed"]]
            if not bad.empty:
                ax.scatter(bad["date"], bad[col], marker="x", s=80, color="red", zorder=3,
                           label=_text(f"{label}: gate failed"))
    ax_acc.set_ylim(-0.03, 1.03)
    ax_acc.set_title("accuracy over nightly runs")
    ax_acc.set_ylabel("accuracy (all cells)")
    ax_lat.set_title("median latency over nightly runs")
    ax_lat.set_ylabel("median of cell p50 latency (s)")
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    for ax in (ax_acc, ax_lat):
        locator = AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.set_xlabel("run date")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelrotation=30)
    _save(fig, path)
    return fig
