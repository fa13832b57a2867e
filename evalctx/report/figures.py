"""What every plot shares: a figure on the Agg canvas, text shown as typed, colours readers with a colour-vision
deficiency can tell apart, readable log axes, PNG output. matplotlib is imported only inside the functions.

Figures are built on the Agg canvas directly instead of through pyplot: that works on a headless node (no
DISPLAY), never touches the caller's pyplot backend or state (a notebook keeps its inline backend), and does not
leak figures into pyplot's registry when a report draws dozens of them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pandas as pd

from evalctx.analysis.runs import length_label
from evalctx.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

# matplotlib's "petroff10" sequence (Petroff 2021, "Accessible Color Sequences for Data Visualization",
# arXiv:2107.02270): distinguishable under the common colour-vision deficiencies, unlike tab10's red/green pair.
# Written out because matplotlib ships it only from 3.10.
LINE_COLORS = ("#3f90da", "#ffa90e", "#bd1f01", "#94a4a2", "#832db6", "#a96b59", "#e76300", "#b9ac70",
               "#717581", "#92dadd")
LINE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LEGEND_CHARS = 40
"""A legend entry (a label) is cut to this many characters, so that a long label cannot squeeze the axes."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("matplotlib is not installed: pip install 'evalctx[plot]'") from None


def figure(width: float, height: float, ncols: int = 1) -> tuple["Figure", Any]:
    """A constrained-layout figure of ``width`` x ``height`` inches with ``ncols`` axes side by side."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: PNG output with no display
    axes = fig.subplots(1, ncols, squeeze=True)
    return fig, axes


def mpl_text(value: Any, max_chars: int | None = None) -> str:
    """A label, task or model name as matplotlib text that shows it as typed: ``$`` escaped (mathtext would parse
    "$" pairs as formulas, and fail on an odd count), and a leading ``_`` kept off the legend's hide-this marker.
    ``max_chars``: longer text is cut there with "…" (a legend entry; the report's tables carry it whole)."""
    text = str(value)
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars - 1] + "…"
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def title_text(text: str, width_in: float) -> str:
    """A title wrapped to the figure's width (about 8 characters per inch at the title's size), then made
    matplotlib-safe by :func:`mpl_text`. Wrapped first, so that a line break never splits an escaped "\\$"."""
    import textwrap

    return "\n".join(mpl_text(line) for line in textwrap.wrap(text, max(20, int(width_in * 8))))


def save(fig: "Figure", path: str | Path | None) -> None:
    """Write ``fig`` as a PNG under a temporary name and rename it: a kill mid-plot leaves the old picture (or
    none), never an unreadable one."""
    if path is not None:
        from evalctx.results.rundir import atomic_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(Path(path), binary=True) as fh:
            fig.savefig(fh, format="png", dpi=110)


def select_task(df: pd.DataFrame, task: str | None) -> pd.DataFrame:
    if task is None:
        return df
    sel = df[df["task"] == task]
    if sel.empty:
        raise UsageError(f"no rows for task {task!r}; tasks here: {sorted(df['task'].unique())}")
    return sel


def labels_of(df: pd.DataFrame) -> list[str]:
    return sorted(df["label"].astype(str).unique()) if "label" in df.columns else [""]


def line_style(i: int) -> dict[str, str]:
    """Colour and marker of the i-th line: a reader who cannot tell the colours apart still has the markers."""
    return {"color": LINE_COLORS[i % len(LINE_COLORS)], "marker": LINE_MARKERS[i % len(LINE_MARKERS)]}


def log2_length_axis(ax: Any, lengths: list[int]) -> None:
    """Context length on a log2 x axis, ticked at the lengths run and labelled "4K", "128K", "1M"."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [length_label(n) for n in lengths])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("context length (tokens)")


def seconds_text(v: float, significant: int | None = None) -> str:
    """A duration in the unit that keeps it short: 2e-05 -> "20 µs", 0.05 -> "50 ms", 2.0 -> "2 s".

    ``significant``: round to that many significant digits (a measured value in a table: 0.00010804 -> "108 µs",
    271.13 -> "271 s"); None keeps every digit (a tick value, already round)."""
    x, unit = (v, "s") if v >= 1.0 else (v * 1e3, "ms") if v >= 1e-3 else (v * 1e6, "µs")
    if significant is None:
        return f"{x:g} {unit}"
    return f"{x:,.0f} {unit}" if x >= 10 ** (significant - 1) else f"{x:.{significant}g} {unit}"


def count_text(v: float) -> str:
    """A rate or count with a K/M suffix: 2000 -> "2K", 1500000 -> "1.5M"."""
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}K"
    return f"{v:g}"


# Tick mantissas per decade, finest first: the finest that gives at most MAX_LOG_TICKS ticks is used.
LOG_TICK_MANTISSAS = ((1, 2, 3, 5), (1, 2, 5), (1, 3), (1,))
MAX_LOG_TICKS = 8


def _log_steps(lo: float, hi: float, mantissas: tuple[int, ...]) -> list[float]:
    """The values m x 10^k (m in ``mantissas``) from the last one at or below ``lo`` to the first one at or above
    ``hi``; at least two."""
    k0, k1 = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    grid = [m * 10.0 ** k for k in range(k0, k1 + 1) for m in mantissas]
    # A relative tolerance: 0.02 computed as 2 * 10**-2 may differ from the data's 0.02 in the last bit.
    start = max(i for i, v in enumerate(grid) if v <= lo * (1 + 1e-9))
    end = min(i for i, v in enumerate(grid) if v >= hi * (1 - 1e-9))
    return grid[start:max(end, start + 1) + 1]


def readable_log_y(ax: Any, text: Callable[[float], str]) -> None:
    """A log y axis ticked at 1, 2, 3 and 5 x 10^k (fewer per decade over a wide range) and labelled in plain
    units by ``text`` ("20 ms", "1.5K") instead of matplotlib's 10^k mathtext, whose minor-tick labels
    ("3x10^-2") are hard to read. The limits widen to just beyond the enclosing ticks, so that at least two are
    labelled."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo, hi = ax.dataLim.intervaly
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0:
        return
    for mantissas in LOG_TICK_MANTISSAS:
        steps = _log_steps(lo, hi, mantissas)
        if len(steps) <= MAX_LOG_TICKS:
            break
    ax.set_yscale("log")
    # A little room beyond the outer ticks, so that a point on one is not cut in half by the frame.
    ax.set_ylim(steps[0] / 1.1, steps[-1] * 1.1)
    ax.yaxis.set_major_locator(FixedLocator(steps))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: text(v)))


def cell_text_color(rgba: tuple[float, ...]) -> str:
    """Black on a light cell, white on a dark one (WCAG relative luminance of the cell colour)."""
    def lin(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (lin(c) for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 else "white"
