"""The regression gate: compare a candidate run with a baseline cell by cell (task x context_length x depth), and
per context length pooled over the depths.

Per cell (and per pooled length, see below):

* accuracy: one-sided Fisher exact test that the baseline is better (``p < alpha`` -> ``regression``) and the
  mirror test for ``improved``. Fractional scores (partial credit) are rounded to whole successes.
* ``insufficient``: either side has fewer than ``min_samples`` scored samples. Such a cell is listed, never shown
  as ok, and does not fail the gate, with one exception (a "collapse"): a cell with at least 5 samples a side that
  the base answered perfectly (accuracy 1, no errors) and the candidate fails completely (accuracy 0, or every
  sample an error) is a regression. That is the "engine now answers garbage / crashes" failure; its Fisher
  p-value is at most 1/252, so it is significant even at that size.
* errors: error + unsupported rows per attempted sample, tested like accuracy (``error_regression``). Without it
  an engine that starts failing every 128K request would only show as ``insufficient``.
* latency: the candidate/base ratio of median ``latency_s`` and of median ``ttft_s`` above ``1 + tolerance`` is a
  ``latency_regression`` when the medians also differ by more than ``latency_min_delta_s`` (2 ms): a 10% rise of a
  sub-millisecond request is timer and scheduler jitter (an identical rerun of the fake backend trips it), not
  something anyone can act on. Needs ``min_latency_samples`` timings a side; medians of fewer are noise. Only cold
  rows are timed: a row whose prompt came partly from a KV cache (``n_cached_prompt_tokens`` > 0 or the flag
  ``kv_cache_reuse``) measured its suffix's prefill, which depends on the order the samples ran in.
* run-level error rate: error + unsupported rows per attempted sample over the cells both runs have. A candidate
  whose rate rose by more than ``max_error_rate_rise`` (default 0: any rise) fails the gate, however few samples a
  cell has: an error row is a sample the candidate could not answer (a crash, a timeout, a cut answer), not
  sampling noise, and the per-cell test above needs ``min_samples`` a side to see anything.
* coverage: a cell only in the baseline (``only_in_base``) is lost coverage and fails the gate unless
  ``allow_missing``; a cell only in the candidate is reported and never fails.

Pooled level (``pooled=True``, the default): at 20 samples a cell a drop from 100% to 85% at every depth of one
length is invisible cell by cell (p = 0.12 each) and obvious pooled (100 samples a side: p ~ 2e-5). So for each
(task, context_length) the samples of every depth that BOTH runs have are pooled into one row (``level ==
"length"``, ``depth`` NaN, shown as "all") and judged by the same rules as a cell: Fisher on accuracy and on
errors, latency medians, min_samples on the pooled counts, collapse. A length with a single common depth gets no
pooled row: it would repeat that cell's test and count it twice in the family. Cell rows have ``level == "cell"``.
A failing verdict on a pooled row fails the gate like one on a cell.

Multiple testing: a nightly suite has tens of cells, so by default p-values are Holm-adjusted (family-wise error
<= alpha); otherwise an unchanged model at 50-90% accuracy would fail some night by chance and the gate would be
ignored. The family is every row that can be judged: the cells with enough samples a side plus the pooled
lengths with enough pooled samples a side (for the error test: every row where it ran). The pooled rows make the
family larger (60 cells + 12 lengths in the nightly suite), which costs the cell tests a little power for much
more power against drops spread over the depths. ``correction="none"`` uses raw p-values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from evalctx.results.summary import warm_rows
from evalctx.stats import newcombe_interval

CELL = ["task", "context_length", "depth"]
LENGTH = ["task", "context_length"]
FAILING = ("regression", "error_regression", "latency_regression")
COLLAPSE_MIN_N = 5


def _hypergeom_sf(k: int, total: int, good: int, draws: int) -> float:
    """P(X >= k), X ~ Hypergeometric(total, good, draws), exact in integers."""
    lo, hi = max(k, 0, draws - (total - good)), min(good, draws)
    if lo > hi:
        return 0.0
    num = sum(math.comb(good, x) * math.comb(total - good, draws - x) for x in range(lo, hi + 1))
    return num / math.comb(total, draws)


def fisher_greater(a: int, b: int, c: int, d: int) -> float:
    """One-sided Fisher exact p-value for the table [[a, b], [c, d]] with alternative "greater" (the odds ratio
    of row 1 exceeds row 2: here, the baseline's success rate exceeds the candidate's).

    Uses scipy when installed, else the exact hypergeometric tail, so the gate runs without scipy."""
    if a + b == 0 or c + d == 0:
        return 1.0
    try:
        from scipy.stats import fisher_exact
    except ImportError:
        return min(1.0, _hypergeom_sf(a, a + b + c + d, a + c, a + b))
    return float(fisher_exact([[a, b], [c, d]], alternative="greater")[1])


def holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (NaN entries are left out of the family and stay NaN)."""
    idx = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])
    m, out, running = len(idx), [math.nan] * len(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def _prepare(df: pd.DataFrame) -> pd.DataFrame:
    """One run's samples with the rounded depth and the per-sample columns the counts are made of."""
    df = df.assign(depth=df["depth"].astype(float).round(6))
    ok = df["status"] == "ok"
    timed = ok & ~warm_rows(df)  # a warm row's TTFT is its suffix's prefill: not comparable (results.summary)
    return df.assign(_ok=ok, _succ=df["score"].where(ok).fillna(0.0),
                     _lat=df["latency_s"].where(timed) if "latency_s" in df else math.nan,
                     _ttft=df["ttft_s"].where(timed) if "ttft_s" in df else math.nan)


def _cells(df: pd.DataFrame) -> pd.DataFrame:
    """Per-cell counts, successes and median timings of one run's samples."""
    return _stats(_prepare(df), CELL)


def _stats(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Counts, successes and median timings per group of prepared samples."""
    g = df.groupby(by, sort=True)
    return pd.DataFrame({
        "attempted": g.size(), "n": g["_ok"].sum(), "succ": g["_succ"].sum(),
        "lat": g["_lat"].median(), "ttft": g["_ttft"].median(),
        "n_lat": g["_lat"].count(), "n_ttft": g["_ttft"].count(),
    })


@dataclass
class CompareResult:
    table: pd.DataFrame
    """One row per cell (``level == "cell"``) and, with ``pooled``, one per (task, context_length) pooled over the
    depths both runs have (``level == "length"``, ``depth`` NaN, ``pooled_depths`` the number of depths pooled),
    each after its length's cells: base/cand counts, accuracies, p-values, error rates, latency ratios, verdict,
    note."""
    regressed: bool
    alpha: float
    min_samples: int
    latency_tolerance: float
    allow_missing: bool
    correction: str
    params: dict[str, Any] = field(default_factory=dict)
    pooled: bool = False
    problems: list[str] = field(default_factory=list)
    """Why the gate cannot pass whatever the cells say (nothing compared, a run that did not finish); each fails it."""
    differences: list[Any] = field(default_factory=list)
    """:class:`evalctx.analysis.comparability.Difference` of the two runs besides their cells (settings compared across
    with ``--allow-different``, and the system under test), set by the caller that read the manifests."""
    errors: dict[str, Any] = field(default_factory=dict)
    """Run-level error rates over the cells both runs have: ``base_rate``, ``cand_rate``, ``base_errors``,
    ``cand_errors``, ``base_attempted``, ``cand_attempted``, ``rose`` (the gate failed on it)."""

    def counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.table["verdict"].value_counts().items()}

    def headline(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items()))
        word = "REGRESSION" if self.regressed else "PASS"
        n_pooled = int((self.table["level"] == "length").sum()) if "level" in self.table else 0
        e = self.errors
        rose = (f"; error rate rose {e['base_rate']:.1%} -> {e['cand_rate']:.1%} ({e['base_errors']} -> "
                f"{e['cand_errors']} error/unsupported rows)") if e.get("rose") else ""
        why = "".join(f"; {p}" for p in self.problems)
        if not n_pooled:
            return f"{word}: {len(self.table)} cells ({counts}){rose}{why}"
        return f"{word}: {len(self.table) - n_pooled} cells + {n_pooled} pooled lengths ({counts}){rose}{why}"

    def add_problem(self, problem: str) -> None:
        """A reason the gate fails that no cell shows (the run's status)."""
        self.problems.append(problem)
        self.regressed = True

    def settings(self) -> str:
        delta_ms = 1000 * float(self.params.get("latency_min_delta_s", 0.0))
        family = "cells and pooled lengths" if self.pooled else "cells"
        return (f"alpha {self.alpha:g} (one-sided Fisher exact, {self.correction} correction across {family}), "
                f"min samples {self.min_samples}, latency tolerance {self.latency_tolerance:.0%} "
                f"and > {delta_ms:g} ms, run error rate may rise by "
                f"{float(self.params.get('max_error_rate_rise', 0.0)):.1%}"
                + (", missing cells allowed" if self.allow_missing else ""))

    def to_markdown(self, only_notable: bool = False) -> str:
        """The headline, the test settings and a Markdown table (all cells, or only those not ``ok``)."""
        t = self.table if not only_notable else self.table[self.table["verdict"] != "ok"]
        from evalctx.analysis.comparability import lines as difference_lines

        lines = [f"**{self.headline()}**", "", self.settings(), ""]
        if self.differences:
            lines += ["Differences between the runs (baseline / candidate):", *difference_lines(self.differences), ""]
        if t.empty:
            return "\n".join(lines + ["Every cell is ok." if only_notable else "(no cells)"]) + "\n"
        shown = display_table(t)
        lines.append("| " + " | ".join(shown.columns) + " |")
        lines.append("|" + "|".join("---" for _ in shown.columns) + "|")
        for row in shown.itertuples(index=False):
            lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps({
            "regressed": self.regressed, "headline": self.headline(), "counts": self.counts(),
            "alpha": self.alpha, "min_samples": self.min_samples, "latency_tolerance": self.latency_tolerance,
            "allow_missing": self.allow_missing, "correction": self.correction, "pooled": self.pooled,
            "errors": self.errors, "problems": self.problems,
            "cells": json.loads(self.table.to_json(orient="records")),
            "differences": _as_dicts(self.differences),
        }, indent=2)


def _as_dicts(diffs: list[Any]) -> list[dict[str, Any]]:
    from evalctx.analysis.comparability import as_dicts

    return as_dicts(diffs)


def _fmt(x: Any, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _delta(d: Any, lo: Any, hi: Any) -> str:
    """``-5.0 [-31, +21]``: candidate minus base accuracy in percentage points, Newcombe's 95% interval."""
    if pd.isna(d):
        return ""
    return f"{d * 100:+.1f} [{lo * 100:+.0f}, {hi * 100:+.0f}]"


def display_table(t: pd.DataFrame) -> pd.DataFrame:
    """The table as short strings for Markdown/HTML: accuracy with n, ratios as x1.23."""
    from evalctx.analysis.runs import length_label

    def acc(a: Any, n: Any) -> str:
        if pd.isna(n):
            return ""
        return f"{a:.3f} (n={int(n)})" if n else "n=0"

    return pd.DataFrame({
        "task": t["task"], "length": [length_label(x) for x in t["context_length"]],
        "depth": ["all" if pd.isna(d) else f"{d * 100:g}%" for d in t["depth"]],
        "base": [acc(a, n) for a, n in zip(t["base_accuracy"], t["base_n"])],
        "cand": [acc(a, n) for a, n in zip(t["cand_accuracy"], t["cand_n"])],
        "Δ pp (95% CI)": [_delta(d, lo, hi) for d, lo, hi in zip(t["delta"], t["delta_low"], t["delta_high"])],
        "p": [_fmt(p, ".3g") for p in t["p_adjusted"]],  # Holm-adjusted unless correction="none"
        "err base→cand": [f"{_fmt(a, '.0%')}→{_fmt(b, '.0%')}" for a, b in
                          zip(t["base_error_rate"], t["cand_error_rate"])],
        "latency": ["" if pd.isna(r) else f"x{r:.2f}" for r in t["latency_ratio"]],
        "ttft": ["" if pd.isna(r) else f"x{r:.2f}" for r in t["ttft_ratio"]],
        "verdict": t["verdict"], "note": t["note"],
    })


def compare(base_df: pd.DataFrame, cand_df: pd.DataFrame, alpha: float = 0.05, min_samples: int = 20,
            latency_tolerance: float = 0.10, allow_missing: bool = False, correction: str = "holm",
            min_latency_samples: int = 3, latency_min_delta_s: float = 0.002, pooled: bool = True,
            max_error_rate_rise: float = 0.0) -> CompareResult:
    """Compare two runs' per-sample frames (see the module docstring for the verdicts). ``pooled`` adds one row per
    (task, context_length) pooled over the depths both runs have; ``max_error_rate_rise`` is the rise of the
    run-level error rate (a fraction) that still passes."""
    if correction not in ("holm", "none"):
        raise ValueError(f"correction must be 'holm' or 'none', not {correction!r}")
    base_p, cand_p = _prepare(base_df), _prepare(cand_df)
    base, cand = _stats(base_p, CELL), _stats(cand_p, CELL)
    keys = sorted(set(base.index) | set(cand.index))
    pooled_stats: dict[tuple[Any, Any], tuple[pd.Series, pd.Series, int]] = {}
    if pooled:
        common = set(base.index) & set(cand.index)
        depths: dict[tuple[Any, Any], set[float]] = {}
        for task, length, depth in common:
            depths.setdefault((task, length), set()).add(depth)
        keep = [k for k in common if len(depths[k[:2]]) >= 2]
        if keep:
            sides = [_stats(p[p.set_index(CELL).index.isin(keep)], LENGTH) for p in (base_p, cand_p)]
            for lkey in sides[0].index:
                pooled_stats[lkey] = (sides[0].loc[lkey], sides[1].loc[lkey], len(depths[lkey]))
    rows: list[dict[str, Any]] = []
    for i, key in enumerate(keys):
        b = base.loc[key] if key in base.index else None
        c = cand.loc[key] if key in cand.index else None
        rows.append(_row({**dict(zip(CELL, key)), "level": "cell", "pooled_depths": None}, b, c, min_samples, min_latency_samples))
        lkey = key[:2]
        if lkey in pooled_stats and (i + 1 == len(keys) or keys[i + 1][:2] != lkey):
            pb, pc, n_depths = pooled_stats[lkey]
            rows.append(_row({"task": key[0], "context_length": key[1], "depth": math.nan, "level": "length",
                              "pooled_depths": n_depths}, pb, pc, min_samples, min_latency_samples))
    table = pd.DataFrame(rows)
    if table.empty:
        raise ValueError("both runs are empty: nothing to compare")
    if "pooled_depths" in table:
        table["pooled_depths"] = table["pooled_depths"].astype("Int64")
    _adjust(table, correction, min_samples)
    verdicts = [_verdict(r, alpha, min_samples, latency_tolerance, latency_min_delta_s)
                for r in table.to_dict("records")]
    table["verdict"] = [v for v, _ in verdicts]
    table["note"] = [n for _, n in verdicts]
    errors = _error_rates(base, cand, max_error_rate_rise)
    problems = [] if not table["verdict"].isin(("only_in_base", "only_in_candidate")).all() else \
        ["no cell in common: nothing was compared"]
    regressed = bool(table["verdict"].isin(FAILING).any() or errors["rose"] or problems
                     or (not allow_missing and (table["verdict"] == "only_in_base").any()))
    return CompareResult(table=table, regressed=regressed, alpha=alpha, min_samples=min_samples,
                         latency_tolerance=latency_tolerance, allow_missing=allow_missing, correction=correction,
                         params={"min_latency_samples": min_latency_samples,
                                 "latency_min_delta_s": latency_min_delta_s,
                                 "max_error_rate_rise": max_error_rate_rise},
                         pooled=pooled, errors=errors, problems=problems)


def _error_rates(base: pd.DataFrame, cand: pd.DataFrame, max_rise: float) -> dict[str, Any]:
    """Error + unsupported rows per attempted sample of each run, over the cells both have (lost coverage is judged
    apart), and whether the candidate's rose by more than ``max_rise``."""
    common = sorted(set(base.index) & set(cand.index))
    out: dict[str, Any] = {}
    for side, cells in (("base", base), ("cand", cand)):
        attempted = int(cells.loc[common, "attempted"].sum()) if common else 0
        errors = attempted - int(cells.loc[common, "n"].sum()) if common else 0
        out.update({f"{side}_attempted": attempted, f"{side}_errors": errors,
                    f"{side}_rate": errors / attempted if attempted else 0.0})
    out["rose"] = bool(out["cand_rate"] > out["base_rate"] + max_rise + 1e-12)
    return out


def _row(ident: dict[str, Any], b: pd.Series | None, c: pd.Series | None, min_samples: int,
         min_latency_samples: int) -> dict[str, Any]:
    """One table row (a cell, or a length pooled over depths) from the two sides' counts: raw p-values, ratios."""
    row: dict[str, Any] = dict(ident)
    for side, s in (("base", b), ("cand", c)):
        row[f"{side}_attempted"] = int(s["attempted"]) if s is not None else None
        row[f"{side}_n"] = int(s["n"]) if s is not None else None
        row[f"{side}_accuracy"] = s["succ"] / s["n"] if s is not None and s["n"] else math.nan
        row[f"{side}_error_rate"] = 1 - s["n"] / s["attempted"] if s is not None else math.nan
        row[f"{side}_latency_s_p50"] = s["lat"] if s is not None else math.nan
        row[f"{side}_ttft_s_p50"] = s["ttft"] if s is not None else math.nan
    row["p_value"] = row["p_improved"] = row["p_errors"] = math.nan
    row["latency_ratio"] = row["ttft_ratio"] = math.nan
    row["delta"] = row["delta_low"] = row["delta_high"] = math.nan
    if b is not None and c is not None:
        bs, cs = int(round(b["succ"])), int(round(c["succ"]))
        bn, cn = int(b["n"]), int(c["n"])
        if bn and cn:
            # candidate minus base accuracy, with Newcombe's 95% interval: how large a loss the data allow
            row["delta"] = c["succ"] / cn - b["succ"] / bn
            row["delta_low"], row["delta_high"] = newcombe_interval(b["succ"], bn, c["succ"], cn)
            row["p_value"] = fisher_greater(bs, bn - bs, cs, cn - cs)
            row["p_improved"] = fisher_greater(cs, cn - cs, bs, bn - bs)
        ba, ca = int(b["attempted"]), int(c["attempted"])
        if min(ba, ca) >= min_samples:
            # Errors: does the candidate fail (error/unsupported) more often than the base?
            row["p_errors"] = fisher_greater(bn, ba - bn, cn, ca - cn)
        for name, col, ncol in (("latency_ratio", "lat", "n_lat"), ("ttft_ratio", "ttft", "n_ttft")):
            if min(b[ncol], c[ncol]) >= min_latency_samples and b[col] > 0:
                row[name] = float(c[col] / b[col])
    return row


def _adjust(table: pd.DataFrame, correction: str, min_samples: int) -> None:
    """Holm across the rows (cells and pooled lengths alike) that can be judged: accuracy tests of rows with enough
    samples a side, error tests of rows where one ran. Small rows are left out of the family (they cannot be a
    Fisher regression anyway)."""
    big = (table["base_n"].fillna(0) >= min_samples) & (table["cand_n"].fillna(0) >= min_samples)
    for col, out, family in (("p_value", "p_adjusted", big), ("p_improved", "p_improved_adjusted", big),
                             ("p_errors", "p_errors_adjusted", table["p_errors"].notna())):
        table[out] = table[col]
        family = family & table[col].notna()
        if correction == "holm" and family.any():
            table.loc[family, out] = holm(table.loc[family, col].tolist())


def _verdict(r: dict[str, Any], alpha: float, min_samples: int, tol: float,
             min_delta_s: float) -> tuple[str, str]:
    """The worst finding names the cell; the note lists every finding. A pooled row's note says so first."""
    verdict, note = _cell_verdict(r, alpha, min_samples, tol, min_delta_s)
    if r.get("level") == "length":
        note = f"pooled over {r['pooled_depths']} depths" + (f": {note}" if note else "")
    return verdict, note


def _cell_verdict(r: dict[str, Any], alpha: float, min_samples: int, tol: float,
                  min_delta_s: float) -> tuple[str, str]:
    if r["base_n"] is None or pd.isna(r["base_n"]):
        return "only_in_candidate", "new cell"
    if r["cand_n"] is None or pd.isna(r["cand_n"]):
        return "only_in_base", "lost coverage: the candidate did not run this cell"
    bn, cn = int(r["base_n"]), int(r["cand_n"])
    big = min(bn, cn) >= min_samples
    accuracy = f"accuracy {_fmt(r['base_accuracy'], '.3f') or 'n/a'} -> {_fmt(r['cand_accuracy'], '.3f') or 'n/a'}"
    notes = []
    if r["cand_error_rate"] > r["base_error_rate"]:
        notes.append(f"error rate {r['base_error_rate']:.0%} -> {r['cand_error_rate']:.0%}")
    slow = [f"{name} x{r[ratio]:.2f}" for name, ratio, med in (("latency", "latency_ratio", "latency_s_p50"),
                                                               ("ttft", "ttft_ratio", "ttft_s_p50"))
            if not pd.isna(r[ratio]) and r[ratio] > 1.0 + tol
            and r[f"cand_{med}"] - r[f"base_{med}"] > min_delta_s]
    # A small cell that worked perfectly and now fails completely (wrong answers or errors alike).
    collapse = (not big and min(r["base_attempted"], r["cand_attempted"]) >= COLLAPSE_MIN_N
                and bn == r["base_attempted"] and r["base_accuracy"] >= 1.0 - 1e-9
                and (cn == 0 or r["cand_accuracy"] <= 1e-9))
    if r["p_errors_adjusted"] < alpha:
        return "error_regression", "; ".join([*notes, *slow])
    if big and r["p_adjusted"] < alpha:
        return "regression", "; ".join([accuracy, *notes, *slow])
    if collapse:
        return "regression", "; ".join([f"collapse on a small cell: {accuracy}", *notes, *slow])
    if slow:
        return "latency_regression", "; ".join([*slow, *notes])
    if not big:
        return "insufficient", "; ".join([f"fewer than {min_samples} scored samples a side", *notes])
    if r["p_improved_adjusted"] < alpha:
        return "improved", "; ".join([accuracy, *notes])
    return "ok", "; ".join(notes)
