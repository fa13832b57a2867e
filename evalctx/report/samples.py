"""The samples behind the numbers: a few wrong answers per failing cell, and the error and unsupported rows by
cell and by message. Text here is model output and server messages: the Document escapes it for HTML and
Markdown; messages are also masked for secrets (a URL password in a connection error)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from evalctx import redact
from evalctx.analysis.runs import length_label

MAX_MESSAGES = 5
"""Error messages listed per label, the most frequent first."""
WRONG_PER_CELL = 3
"""Wrong answers shown per failing (label, task, length, depth) cell."""
MAX_WRONG_CELLS = 40
"""Failing cells shown in all, the lowest accuracy first; the rest are counted."""
MAX_ANSWER_CHARS = 160
"""A longer completion is cut there (``evalctx show`` prints it whole)."""

CELL = ["label", "task", "context_length", "depth"]


def answer_text(text: Any) -> str:
    """A completion as a JSON string literal, so that leading spaces, newlines and an empty answer show: " 12345."
    stays distinguishable from "12345"; cut to :data:`MAX_ANSWER_CHARS` characters with "…"."""
    if text is None or (isinstance(text, float) and text != text):
        return "(none)"
    s = str(text)
    return json.dumps(s[:MAX_ANSWER_CHARS], ensure_ascii=False) + ("…" if len(s) > MAX_ANSWER_CHARS else "")


def wrong_answers(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Up to :data:`WRONG_PER_CELL` scored samples scoring below 1 in each failing cell (a (label, task,
    context_length, depth) cell with at least one), for at most :data:`MAX_WRONG_CELLS` cells: the worst cell of
    each (label, task), then the second worst, and so on; listed in (label, task, length, depth) order. Also
    returns the number of failing cells in all.

    Columns: label, task, length, depth, wrong (wrong of scored), sample_id, target, extracted, completion."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame(), 0
    ok = ok.assign(_wrong=ok["score"].astype(float) < 1.0)
    per_cell = ok.groupby(CELL, sort=True, dropna=False).agg(n=("_wrong", "size"), wrong=("_wrong", "sum"),
                                                             accuracy=("score", "mean"))
    failing = per_cell[per_cell["wrong"] > 0]
    # Round robin over (label, task): each one's worst cell, then each one's second worst, ... so that one run
    # failing everywhere cannot fill the list alone.
    rank = failing.groupby(level=["label", "task"])["accuracy"].rank(method="first")
    shown = failing.assign(_rank=rank).sort_values(["_rank", "accuracy"], kind="stable")
    shown = shown.head(MAX_WRONG_CELLS).reset_index()
    picked = ok[ok["_wrong"]].sort_values("sample_id").groupby(CELL, sort=False, dropna=False).head(WRONG_PER_CELL)
    # merge matches NaN depths (tasks without one) as equal keys, which a == filter would not.
    cells = shown[[*CELL, "n", "wrong"]].rename(columns={"n": "_cell_n", "wrong": "_cell_wrong"})
    picked = picked.merge(cells, on=CELL, how="inner")
    picked = picked.sort_values([*CELL, "sample_id"])
    rows = [{"label": r["label"], "task": r["task"], "length": length_label(r["context_length"]),
             "depth": "" if pd.isna(r["depth"]) else f"{r['depth'] * 100:g}%",
             "wrong": f"{int(r['_cell_wrong'])} of {int(r['_cell_n'])}", "sample_id": r["sample_id"],
             "target": r.get("target"), "extracted": r.get("extracted"),
             "completion": answer_text(r.get("completion"))} for r in picked.to_dict("records")]
    return pd.DataFrame(rows), len(failing)


def error_tables(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Error and unsupported rows: counts per (label, task, length, status), and the :data:`MAX_MESSAGES` most
    frequent messages per label (secrets masked) with the lengths they occur at and a sample id to ``show``."""
    bad = df[df["status"] != "ok"]
    if bad.empty:
        return pd.DataFrame(), pd.DataFrame()
    counts = (bad.groupby(["label", "task", "context_length", "status"]).size().rename("count").reset_index())
    counts["context_length"] = [length_label(x) for x in counts["context_length"]]
    counts = counts.rename(columns={"context_length": "length"})
    err = bad.assign(error=bad["error"].fillna("(no message)").map(redact.mask_text) if "error" in bad
                     else "(no message)")
    msgs = (err.groupby(["label", "status", "error"], sort=False)
            .agg(count=("sample_id", "size"), first_sample=("sample_id", "first"),
                 lengths=("context_length", lambda s: ", ".join(length_label(x) for x in sorted(set(s)))))
            .reset_index().sort_values(["label", "count"], ascending=[True, False]))
    msgs = msgs.groupby("label", sort=False).head(MAX_MESSAGES)
    return counts, msgs[["label", "status", "count", "lengths", "error", "first_sample"]]
