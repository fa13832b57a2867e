"""Depth x context length heatmaps: the accuracy of one run, and the difference between two runs.

Depth 0% (the start of the context) is on top, as in gkamradt's LLMTest_NeedleInAHaystack chart. The colour maps
stay readable with a colour-vision deficiency: ``cividis`` for accuracy (Nuñez, Anderton & Renslow 2018,
"Optimizing colormaps with consideration for color vision deficiency", PLoS ONE 13(7): e0199239) instead of
gkamradt's red-yellow-green, which readers with protanopia or deuteranopia cannot tell apart; ColorBrewer's
``RdBu`` (listed there as colour-blind safe) for differences. Every cell also prints its number, so that the
colour is never the only carrier of a value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd

from evalctx.analysis.runs import length_label
from evalctx.errors import UsageError
from evalctx.report.figures import (cell_text_color, figure, labels_of, require_matplotlib, save, select_task,
                                    title_text)
from evalctx.results.summary import summarize

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from evalctx.analysis.compare import CompareResult

ACCURACY_CMAP = "cividis"
DIFFERENCE_CMAP = "RdBu"
NO_DATA_COLOR = "white"  # cividis runs through grey: a grey "no score" cell would read as ~50%
# The gate's verdicts marked on a difference cell: the significant drops and rises.
MARKS = {"regression": "▼", "error_regression": "▼", "improved": "▲"}


def _one_label(sel: pd.DataFrame, label: str | None, task: str) -> tuple[pd.DataFrame, str]:
    labels = labels_of(sel)
    if label is None and len(labels) > 1:
        raise UsageError(f"several labels in the data ({', '.join(labels)}): pass label=")
    label = labels[0] if label is None else label
    if "label" in sel.columns:
        sel = sel[sel["label"].astype(str) == label]
        if sel.empty:
            raise UsageError(f"no rows for label {label!r} and task {task!r}")
    return sel, label


def _cells(sel: pd.DataFrame) -> pd.DataFrame:
    """Per (depth, context_length) summary with the depth rounded as the gate rounds it."""
    cells = summarize(sel.assign(depth=sel["depth"].astype(float).round(6)), by=["depth", "context_length"])
    return cells.set_index(["depth", "context_length"])


def _grid(keys: Iterable[tuple[float, int]]) -> tuple[list[float], list[int]]:
    """The rows (depths, ascending; a NaN depth of a results file without depths last, once) and columns
    (context lengths) of the cells ``keys``."""
    keys = list(keys)
    depths = pd.Index([d for d, _ in keys], dtype=float).unique().sort_values()
    return list(depths), sorted({int(n) for _, n in keys})


def _axes_grid(ax: Any, depths: list[float], lengths: list[int]) -> None:
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), ["n/a" if math.isnan(d) else f"{round(d * 100, 1):g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")


def _size(n_lengths: int, n_depths: int) -> tuple[float, float]:
    # At least 5 in wide so that the title (model and task) fits even for one or two lengths.
    return max(5.0, 1.6 + 0.95 * n_lengths), max(2.8, 1.3 + 0.5 * n_depths)


def _hatch(ax: Any, i: int, j: int) -> None:
    """Hatch a cell without a value, so that it reads as "no data" and not as a colour of the scale."""
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#c8c8c8", linewidth=0))


def _no_score_text(row: pd.Series | None) -> str:
    """Why a cell has no accuracy: never run, or every sample an error or unsupported."""
    if row is None:
        return "not run"
    n_err, n_uns = int(row["n_error"]), int(row["n_unsupported"])
    kind = "error" if n_err and not n_uns else "unsupported" if n_uns and not n_err else "no score"
    return f"{kind}\nn=0"


def heatmap(df: pd.DataFrame, task: str, label: str | None = None, path: str | Path | None = None) -> "Figure":
    """Accuracy in percent per (depth, context length) cell of one label, with the cell's ``n`` (scored samples)
    under it. A cell with no scored sample is hatched white and says why ("error", "unsupported"; "not run" where
    the task has no such cell). Raises UsageError when the task or label has no rows, or when ``label`` is None and
    the frame holds several labels."""
    require_matplotlib()
    import matplotlib

    sel, label = _one_label(select_task(df, task), label, task)
    cells = _cells(sel)
    depths, lengths = _grid(cells.index)
    values = np.full((len(depths), len(lengths)), np.nan)
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            if (d, n) in cells.index:
                values[i, j] = 100.0 * cells.loc[(d, n), "accuracy"]

    size = _size(len(lengths), len(depths))
    fig, ax = figure(*size)
    cmap = matplotlib.colormaps[ACCURACY_CMAP].with_extremes(bad=NO_DATA_COLOR)
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=100.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="accuracy (%)", fraction=0.05)
    _axes_grid(ax, depths, lengths)
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            row = cells.loc[(d, n)] if (d, n) in cells.index else None
            v = values[i, j]
            if math.isnan(v):
                _hatch(ax, i, j)
                ax.text(j, i, _no_score_text(row), ha="center", va="center", fontsize=7, color="black",
                        backgroundcolor="white")
            else:
                ax.text(j, i, f"{v:.0f}%\nn={int(row['n'])}", ha="center", va="center", fontsize=8,
                        color=cell_text_color(cmap(v / 100.0)))
    model = ""
    if "model" in sel.columns and sel["model"].notna().any():
        m = str(sel["model"].dropna().iloc[0])
        model = f" ({m})" if m != label else ""
    ax.set_title(title_text(f"{label}{model}: {task}", size[0]))
    save(fig, path)
    return fig


def _marks(result: "CompareResult | None", task: str) -> dict[tuple[float, int], str]:
    if result is None:
        return {}
    t = result.table
    cells = t[(t["level"] == "cell") & (t["task"] == task)] if "level" in t else t[t["task"] == task]
    return {(round(float(r.depth), 6), int(r.context_length)): MARKS[r.verdict]
            for r in cells.itertuples(index=False) if r.verdict in MARKS}


def difference_heatmap(base: pd.DataFrame, cand: pd.DataFrame, task: str, result: "CompareResult | None" = None,
                       path: str | Path | None = None) -> "Figure":
    """Candidate minus baseline accuracy per (depth, context length) cell of ``task``, in percentage points, with
    both accuracies under it ("-40" over "100→60%"). ``base`` and ``cand`` are the samples of one run each.
    Blue: the candidate is better, red: worse, on a fixed -100..+100 scale so that two plots compare.

    ``result`` (the gate's :func:`evalctx.analysis.compare.compare` of the two) marks the cells it judged a significant
    drop (▼: regression, error_regression) or rise (▲: improved). Cells only one run has, or with no scored
    sample on a side, are hatched white and say so. Raises UsageError when neither run has the task."""
    require_matplotlib()
    import matplotlib

    b_sel, c_sel = base[base["task"] == task], cand[cand["task"] == task]
    if b_sel.empty and c_sel.empty:
        raise UsageError(f"no rows for task {task!r} in either run")
    b_cells = _cells(b_sel) if not b_sel.empty else pd.DataFrame()
    c_cells = _cells(c_sel) if not c_sel.empty else pd.DataFrame()
    keys = set(b_cells.index) | set(c_cells.index)
    depths, lengths = _grid(keys)
    b_label, c_label = (str(x["label"].iloc[0]) if not x.empty else "" for x in (b_sel, c_sel))
    marks = _marks(result, task)

    values = np.full((len(depths), len(lengths)), np.nan)
    texts: dict[tuple[int, int], str] = {}
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            b = b_cells.loc[(d, n), "accuracy"] if (d, n) in b_cells.index else None
            c = c_cells.loc[(d, n), "accuracy"] if (d, n) in c_cells.index else None
            if b is None or c is None:
                texts[(i, j)] = "only in\nbaseline" if c is None else "new in\ncandidate"
            elif math.isnan(b) or math.isnan(c):
                texts[(i, j)] = "no score\n" + ("baseline" if math.isnan(b) else "candidate")
            else:
                values[i, j] = diff = 100.0 * (c - b)
                sign = "±0" if round(diff) == 0 else f"{diff:+.0f}"
                mark = marks.get((d, n), "")
                texts[(i, j)] = f"{sign}{' ' + mark if mark else ''}\n{100 * b:.0f}→{100 * c:.0f}%"

    size = _size(len(lengths), len(depths))
    fig, ax = figure(*size)
    cmap = matplotlib.colormaps[DIFFERENCE_CMAP].with_extremes(bad=NO_DATA_COLOR)
    image = ax.imshow(values, cmap=cmap, vmin=-100.0, vmax=100.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="difference (percentage points)", fraction=0.05)
    _axes_grid(ax, depths, lengths)
    for (i, j), text in texts.items():
        v = values[i, j]
        if math.isnan(v):
            _hatch(ax, i, j)
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black", backgroundcolor="white")
        else:
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color=cell_text_color(cmap((v + 100.0) / 200.0)))
    title = title_text(f"{task}: {c_label} − {b_label}", size[0] * 1.2)  # at 10 pt: more per inch
    if result is not None:
        title += "\n▼ / ▲: a significant drop / rise (the gate's one-sided Fisher test)"
    ax.set_title(title, fontsize=10)
    save(fig, path)
    return fig
