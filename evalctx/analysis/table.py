"""The table printed at the end of a run: per task, accuracy by length x depth, and per length with a 95% CI; with
several tasks, their average per length (RULER's headline) and the effective length on it."""

from __future__ import annotations

import textwrap

import pandas as pd

from evalctx.results.summary import summarize


LEGEND = ("acc %: mean score of the scored samples; 95% CI: Wilson interval; n: scored samples; err: backend "
          "errors (not scored, retried on resume); uns: unsupported by the backend (not scored); p50 s: median "
          "latency per sample, seconds, of the samples whose prompt was not served from a KV cache")


def _pct(x: float) -> str:
    return "   -" if x != x else f"{100 * x:4.0f}"


def format_summary(df: pd.DataFrame) -> str:
    if df.empty:
        return "no results"
    lines: list[str] = []
    for task, g in df.groupby("task", sort=True):
        # The length x depth grid by pandas' pivot (a depth some length lacks is NaN, printed "-").
        grid = summarize(g, by=("context_length", "depth")).pivot(index="context_length", columns="depth",
                                                                     values="accuracy")
        per_len = summarize(g, by=("context_length",))
        depths = list(grid.columns)
        head = "length  | " + " ".join(f"{d * 100:4.0f}" for d in depths) + " | acc %  95% CI        n  err uns   p50 s"
        lines.append(f"{task}: accuracy % by depth (% of haystack)")
        lines.append(head)
        lines.append("-" * len(head))
        for _, row in per_len.iterrows():
            length = int(row["context_length"])
            accs = " ".join(_pct(v) for v in grid.loc[length])
            ci = "" if row["n"] == 0 else f"[{100 * row['ci_low']:3.0f},{100 * row['ci_high']:4.0f}]"
            lat = row["latency_s_p50"]
            lat_s = "" if lat != lat else f"{lat:7.3f}"  # one format for every row: seconds, ms resolution
            lines.append(f"{length:>7} | {accs} | {_pct(row['accuracy'])}  {ci:<11} {int(row['n']):>4} "
                         f"{int(row['n_error']):>4} {int(row['n_unsupported']):>3} {lat_s}")
        lines += _flag_lines(g)
        lines += depth_lines(g)
        lines.append("")
    if df["task"].nunique() > 1:
        lines += _average_lines(df)
    lines.append(textwrap.fill(LEGEND, width=100))
    return "\n".join(lines).rstrip()


def _flag_lines(rows: pd.DataFrame) -> list[str]:
    """One line per row flag among the scored rows of one task: how many, at which lengths, what it means (a 0%
    under ``short_budget`` is the budget's, a score under ``beyond_trained_window`` is extrapolation)."""
    from evalctx.records import FLAGS

    if "flags" not in rows.columns:
        return []
    found: dict[str, list[int]] = {}
    for flags, length, status in zip(rows["flags"], rows["context_length"], rows["status"]):
        for flag in (flags if flags is not None and status == "ok" else []):
            found.setdefault(str(flag), []).append(int(length))
    return [textwrap.fill(f"flagged {flag}: {len(lengths)} scored samples at length "
                          f"{', '.join(map(str, sorted(set(lengths))))}: {FLAGS.get(flag, '')}", width=100)
            for flag, lengths in sorted(found.items())]


DEPTH_NOTE = 0.05
"""A cell whose needles sit on average further than this fraction of the haystack from the column's depth is named
under the table (beyond :data:`evalctx.tasks.haystack_task.DEPTH_TOLERANCE` a sample is refused instead)."""


def depth_lines(rows: pd.DataFrame) -> list[str]:
    """One line naming the cells of one task whose needles were built away from the asked depth (the nearest
    sentence boundary can be far in a haystack of long sentences at a short length), with where they went."""
    if "depth_actual" not in rows.columns:
        return []
    ok = rows[(rows["status"] == "ok") & rows["depth_actual"].notna() & (rows["depth"] < 1.0)]
    if ok.empty:
        return []
    cells = ok.groupby(["context_length", "depth"])["depth_actual"].agg(["min", "max", "mean"]).reset_index()
    off = cells[(cells["mean"] - cells["depth"]).abs() > DEPTH_NOTE]
    if off.empty:
        return []
    parts = [f"{int(r.context_length)} @ {100 * r.depth:.0f}%: {100 * r['min']:.0f}-{100 * r['max']:.0f}%"
             for _, r in off.iterrows()]
    return [textwrap.fill(f"depth as built differs from the column by more than {100 * DEPTH_NOTE:g}% of the "
                          f"haystack (length @ depth: where the needles went) in {len(parts)} cells: "
                          f"{'; '.join(parts[:8])}{' ...' if len(parts) > 8 else ''} (depth_actual in "
                          "results.parquet)", width=100)]


def _average_lines(df: pd.DataFrame) -> list[str]:
    from evalctx.analysis.runs import RULER_THRESHOLD, suite_average, suite_eff_text, suite_effective_length

    avg = suite_average(df.assign(label=""))
    eff = suite_effective_length(df.assign(label=""))[""]
    n_tasks = int(avg["n_tasks"].iloc[0])
    lines = [f"average over the {n_tasks} tasks, as RULER reports it: accuracy % per length, each task weighted "
             "equally",
             "length  | avg %", "----------------"]
    for row in avg.itertuples(index=False):
        unscored = [t for t in row.missing.split(", ") if t and t not in row.not_run.split(", ")]
        notes = ([f"not run: {row.not_run}"] if row.not_run else []) + (
            [f"no scored sample of: {', '.join(unscored)}"] if unscored else [])
        note = f"  ({'; '.join(notes)})" if notes else ""
        avg_s = "    -" if row.accuracy != row.accuracy else f"{100 * row.accuracy:5.1f}"
        lines.append(f"{row.context_length:>7} | {avg_s}{note}")
    skipped = "; lengths some task is not run at are skipped" if (avg["not_run"] != "").any() else ""
    lines.append(f"effective length (average >= {100 * RULER_THRESHOLD:g}% here and at every shorter length"
                 f"{skipped}): {suite_eff_text(eff, avg)}")
    return lines
