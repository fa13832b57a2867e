"""The table printed at the end of a run: per task, accuracy by length x depth, and per length with a 95% CI."""

from __future__ import annotations

import math
import textwrap

import pandas as pd

from evalctx.results.summary import summarize


LEGEND = ("acc %: mean score of the scored samples; 95% CI: Wilson interval; n: scored samples; err: backend "
          "errors (not scored, retried on resume); uns: unsupported by the backend (not scored); p50 s: median "
          "latency per sample, seconds")


def _pct(x: float) -> str:
    return "   -" if x != x else f"{100 * x:4.0f}"


def format_summary(df: pd.DataFrame) -> str:
    if df.empty:
        return "no results"
    lines: list[str] = []
    for task, g in df.groupby("task", sort=True):
        cells = summarize(g, by=("context_length", "depth"))
        per_len = summarize(g, by=("context_length",))
        depths = sorted(cells["depth"].unique())
        head = "length  | " + " ".join(f"{d * 100:4.0f}" for d in depths) + " | acc %  95% CI        n  err uns   p50 s"
        lines.append(f"{task}: accuracy % by depth (% of haystack)")
        lines.append(head)
        lines.append("-" * len(head))
        for _, row in per_len.iterrows():
            length = int(row["context_length"])
            sub = cells[cells["context_length"] == length].set_index("depth")
            accs = " ".join(_pct(sub["accuracy"].get(d, math.nan)) for d in depths)
            ci = "" if row["n"] == 0 else f"[{100 * row['ci_low']:3.0f},{100 * row['ci_high']:4.0f}]"
            lat = row["latency_s_p50"]
            lat_s = "" if lat != lat else f"{lat:7.3f}"  # one format for every row: seconds, ms resolution
            lines.append(f"{length:>7} | {accs} | {_pct(row['accuracy'])}  {ci:<11} {int(row['n']):>4} "
                         f"{int(row['n_error']):>4} {int(row['n_unsupported']):>3} {lat_s}")
        lines.append("")
    lines.append(textwrap.fill(LEGEND, width=100))
    return "\n".join(lines).rstrip()
