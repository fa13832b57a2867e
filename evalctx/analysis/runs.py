"""Load run directories into one tidy pandas DataFrame and answer the questions asked of it: per-cell summaries,
effective context length, readable length labels.

A run directory is what the runner writes: ``manifest.json``, ``journal/*.jsonl`` and, once the run finished,
``results.parquet``. A run killed before the end has no parquet; its journal still holds every finished batch, so
it is loaded from there (the report then says the run is partial).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from evalctx.errors import UsageError
from evalctx.results.journal import read_journals
from evalctx.results.rundir import read_manifest
from evalctx.results.summary import summarize

# RULER's effective-length threshold is Llama-2-7B's 4K score, 85.6 on a 0-100 scale.
RULER_THRESHOLD = 0.856
# NoLiMa: effective while at least 85% of the model's own short-context (base) score.
NOLIMA_RELATIVE = 0.85

# Engine config fields copied from the manifest when a run is loaded from its journal (the parquet has them).
_ENGINE_PREFIX = "engine_"


def length_label(n: int | float) -> str:
    """Context length as people write it, 1024-based: 4096 -> "4K", 131072 -> "128K", 1048576 -> "1M".

    Lengths that are not a whole number of K (1000, 1536) stay as digits. So do multiples of 1000: 128000 is
    125 x 1024, but whoever chose it meant "128K" in decimal, and neither "125K" nor "128K" next to a real 131072
    would be honest (RULER #34: the two are routinely confused)."""
    n = int(n)
    if n % 1000 == 0:
        return str(n)
    if n > 0 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n > 0 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "manifest.json").is_file() or (p / "results.parquet").is_file()
                           or any((p / "journal").glob("*.jsonl")))


def load_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest, or {} when there is none (an old or hand-made results folder). Raises UsageError when
    it is not a readable JSON object."""
    return read_manifest(Path(run_dir)) or {}


def run_label(manifest: Mapping[str, Any], fallback: str) -> str:
    backend = manifest.get("backend") or {}
    return str(manifest.get("label") or backend.get("model") or manifest.get("run_id") or fallback)


def _read_journal(run_dir: Path, config_hash: str | None = None) -> pd.DataFrame:
    """Journal rows, one per sample id, with the runner's own resume rules (one reader for both): rows of another
    configuration than the manifest's are left out, as the runner leaves them out."""
    return pd.DataFrame(list(read_journals(run_dir, config_hash).values()))


def _journal_is_newer(run_dir: Path, parquet: Path) -> bool:
    """Whether a journal was written after results.parquet: a later command appended rows (and was killed before
    it rewrote results.parquet), so the journal holds what a resume would see."""
    folder = run_dir / "journal"
    if not folder.is_dir():
        return False
    times = [f.stat().st_mtime_ns for f in folder.glob("*.jsonl") if f.stat().st_size]
    return bool(times) and (not parquet.is_file() or max(times) > parquet.stat().st_mtime_ns)


def _constant_columns(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The per-run constant columns the runner adds to results.parquet, rebuilt from the manifest."""
    backend = manifest.get("backend") or {}
    cols: dict[str, Any] = {"backend": backend.get("backend"), "model": backend.get("model")}
    for k, v in (backend.get("engine") or {}).items():
        cols[_ENGINE_PREFIX + k] = v
    return cols


def load_run(run_dir: str | Path) -> pd.DataFrame:
    """One row per sample of one run, with ``label``, ``run_id``, ``created_at`` and ``run_status`` columns.

    Reads results.parquet, unless a journal is newer (a later command appended rows and was killed before it
    rewrote results.parquet) or there is none: then the journal as the runner reads it (its rows of the manifest's
    configuration, one per sample id, a retried error replaced by its answer), so that a report, compare, show and
    the gate see what a resume would see. Raises UsageError when ``run_dir`` is not a run directory."""
    p = Path(run_dir)
    if not p.exists():
        raise UsageError(f"{p}: no such directory")
    if not is_run_dir(p):
        raise UsageError(f"{p}: not a run directory (no manifest.json, results.parquet or journal/*.jsonl)")
    manifest = load_manifest(p)
    parquet = p / "results.parquet"
    if parquet.is_file() and not _journal_is_newer(p, parquet):
        try:
            df = pd.read_parquet(parquet)
        except Exception as exc:  # pyarrow raises several types for a truncated file
            raise UsageError(f"{parquet}: unreadable ({type(exc).__name__}: {exc})") from None
        from_journal = False
    else:
        hash_ = manifest.get("config_hash")
        df = _read_journal(p, hash_ if isinstance(hash_, str) else None)
        from_journal = True
    if df.empty:
        raise UsageError(f"{p}: the run has no results yet")
    missing = {"task", "context_length", "status"} - set(df.columns)
    if missing:
        raise UsageError(f"{p}: results lack the columns {sorted(missing)}")
    if from_journal:
        for k, v in _constant_columns(manifest).items():
            if k not in df.columns:
                df[k] = v
    run_id = str(manifest.get("run_id") or (df["run_id"].iloc[0] if "run_id" in df.columns else p.name))
    df["run_id"] = run_id
    if manifest.get("label") or "label" not in df.columns or df["label"].isna().all():
        df["label"] = run_label(manifest, p.name)  # one per run, as the run id (a resume may have renamed it)
    df["created_at"] = manifest.get("created_at")
    # A partial run must never read as a finished one: the status travels with every row.
    df["run_status"] = manifest.get("status") or ("interrupted" if from_journal and not parquet.is_file()
                                                  else "complete")
    return _tidy(df)


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["context_length"] = pd.to_numeric(df["context_length"]).astype("int64")
    if "depth" in df.columns:
        df["depth"] = pd.to_numeric(df["depth"], errors="coerce").astype(float)
    else:
        df["depth"] = math.nan
    for col in ("score", "latency_s", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["label"] = df["label"].astype(str)
    if "target" in df.columns:
        df["target"] = [_target_list(t) for t in df["target"]]
    return df


def _target_list(value: Any) -> list[str]:
    """A row's reference answers as a list: parquet gives arrays, and results written before ``target`` became a
    list column hold the answers ``|``-joined (a bare string a scorer must never see)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        return value.split("|") if value else []
    return [str(v) for v in value]


def load_runs(run_dirs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> pd.DataFrame:
    """All runs in one frame (the union of their columns, engine_* included).

    ``run_dirs`` is one run directory (str or Path) or an iterable of them. Two runs with the same label (the same model twice) get ``label (run_id)`` so that plots and tables, which
    group by label, keep them apart."""
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]  # a str is iterable too: its characters are not run directories
    frames = [load_run(d) for d in run_dirs]
    if not frames:
        raise UsageError("no run directories given")
    run_ids = [f["run_id"].iloc[0] for f in frames]
    if len(set(run_ids)) < len(run_ids):
        dup = next(r for r in run_ids if run_ids.count(r) > 1)
        raise UsageError(f"run {dup} is given twice")
    ids_per_label: dict[str, set[str]] = {}
    for f in frames:
        ids_per_label.setdefault(f["label"].iloc[0], set()).add(f["run_id"].iloc[0])
    for f in frames:
        if len(ids_per_label[f["label"].iloc[0]]) > 1:
            f["label"] = f["label"] + " (" + f["run_id"] + ")"
    return pd.concat(frames, ignore_index=True, sort=False)


def summary(df: pd.DataFrame, by: Sequence[str] = ("label", "task", "context_length", "depth")) -> pd.DataFrame:
    """Per-cell counts, accuracy with Wilson 95% CI and latency percentiles (see results.summary.summarize).

    Columns of ``by`` that the frame lacks are skipped, so the default works on a single run without labels."""
    return summarize(df, by=[c for c in by if c in df.columns])


def length_accuracy(data: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per (label, task, context_length), pooled over depths.

    Takes samples (a ``score`` column) or a summary (``n`` and ``accuracy``); pooling a summary weights each depth
    by its scored count, which equals summarising the samples directly."""
    data = data.copy()
    if "label" not in data.columns:
        data["label"] = ""
    if "accuracy" in data.columns and "n" in data.columns and "score" not in data.columns:
        data = data.assign(_succ=data["accuracy"].fillna(0.0) * data["n"])
        g = data.groupby(["label", "task", "context_length"], sort=True)[["_succ", "n"]].sum().reset_index()
        g["accuracy"] = g["_succ"] / g["n"].where(g["n"] > 0)
        return g.drop(columns="_succ")
    s = summarize(data, by=["label", "task", "context_length"])
    return s[["label", "task", "context_length", "n", "accuracy", "ci_low", "ci_high"]]


def _longest_passing(lengths: Sequence[int], accuracies: Sequence[float], limit: float) -> int | None:
    """The longest length (ascending input) up to which every accuracy is >= ``limit``; NaN fails."""
    best: int | None = None
    for length, a in zip(lengths, accuracies):
        if math.isnan(a) or a < limit:
            break
        best = int(length)
    return best


def effective_length(data: pd.DataFrame, threshold: float = RULER_THRESHOLD,
                     relative: float | None = None) -> dict[tuple[str, str], int | None]:
    """The longest context length whose accuracy, and that of every shorter length, is >= the threshold.

    ``threshold`` is on a 0..1 scale (RULER's 85.6 -> 0.856). With ``relative`` (NoLiMa: 0.85) the threshold is
    ``relative`` x the accuracy at the shortest length of that (label, task) instead. A length with no scored sample
    (every one an error or unsupported) counts as failing: the model did not work there. ``None`` means even the
    shortest length fails (RULER prints "<4K"). Keys are (label, task); label is "" when there is no label column.
    """
    out: dict[tuple[str, str], int | None] = {}
    for (label, task), g in length_accuracy(data).groupby(["label", "task"], sort=True):
        g = g.sort_values("context_length")
        acc = g["accuracy"].tolist()
        if relative is not None and (math.isnan(acc[0]) or acc[0] <= 0):
            # No base score to be relative to: a model that fails at the shortest length has no effective
            # length, rather than passing everywhere against a threshold of 0.
            out[(str(label), str(task))] = None
            continue
        limit = threshold if relative is None else relative * acc[0]
        out[(str(label), str(task))] = _longest_passing(g["context_length"].tolist(), acc, limit)
    return out


def suite_average(data: pd.DataFrame) -> pd.DataFrame:
    """RULER's headline: per (label, context_length), the unweighted mean over the run's tasks of each task's
    accuracy pooled over depths (RULER averages its per-task scores the same way; NVIDIA/RULER #86).

    Takes samples or a summary, like :func:`length_accuracy`; ``task`` is the suite entry's name. The tasks are
    every task the label has at any length. Where one of them has no scored sample at a length (not run there,
    or every sample an error or unsupported), the average would be over other tasks than at the other lengths,
    so it is NaN and ``missing`` names them; ``not_run`` names those of them with no row at all at that length
    (the suite does not run them there). Columns: label, context_length, accuracy (0..1), n_tasks, missing,
    not_run.
    """
    acc = length_accuracy(data)
    rows = []
    for label, g in acc.groupby("label", sort=True):
        tasks = sorted(g["task"].unique())
        for length, h in g.groupby("context_length", sort=True):
            scored = h[h["n"] > 0].dropna(subset=["accuracy"])
            missing = sorted(set(tasks) - set(scored["task"]))
            rows.append({"label": label, "context_length": int(length),
                         "accuracy": math.nan if missing else float(scored["accuracy"].mean()),
                         "n_tasks": len(tasks), "missing": ", ".join(missing),
                         "not_run": ", ".join(sorted(set(tasks) - set(h["task"])))})
    return pd.DataFrame(rows, columns=["label", "context_length", "accuracy", "n_tasks", "missing", "not_run"])


def suite_effective_length(data: pd.DataFrame, threshold: float = RULER_THRESHOLD) -> dict[str, int | None]:
    """RULER's effective length on :func:`suite_average`, per label: the longest length whose average, and every
    shorter length's, reaches ``threshold`` (0..1). Only the lengths every task was run at count: one that some task
    does not run at (``not_run``) says nothing about the model and is skipped, while a task with rows but no scored
    sample there (every one an error or unsupported) makes the average NaN, which fails. None: not even the
    shortest such length passes, or there is none (see :func:`suite_lengths`)."""
    out: dict[str, int | None] = {}
    for label, g in suite_average(data).groupby("label", sort=True):
        g = g[g["not_run"] == ""]
        out[str(label)] = _longest_passing(g["context_length"].tolist(), g["accuracy"].tolist(), threshold)
    return out


def suite_lengths(avg: pd.DataFrame) -> list[int]:
    """The lengths of one label's :func:`suite_average` rows that every task was run at (the effective length's)."""
    return sorted(int(x) for x in avg.loc[avg["not_run"] == "", "context_length"])


def effective_length_table(data: pd.DataFrame, threshold: float = RULER_THRESHOLD,
                           relative: float = NOLIMA_RELATIVE) -> pd.DataFrame:
    """Both definitions side by side, one row per (label, task), for reports."""
    ruler = effective_length(data, threshold=threshold)
    nolima = effective_length(data, relative=relative)
    acc = length_accuracy(data)
    rows = []
    for key, eff in ruler.items():
        g = acc[(acc["label"] == key[0]) & (acc["task"] == key[1])].sort_values("context_length")
        longest = int(g["context_length"].max())
        rows.append({
            "label": key[0], "task": key[1],
            "shortest_accuracy": float(g["accuracy"].iloc[0]),
            "longest_tested": length_label(longest),
            f"effective (>= {threshold:g})": _eff_text(eff, int(g["context_length"].min()), longest),
            f"effective (>= {relative:g} x shortest)": _eff_text(nolima[key], int(g["context_length"].min()),
                                                                 longest),
        })
    return pd.DataFrame(rows)


def suite_average_table(data: pd.DataFrame, threshold: float = RULER_THRESHOLD) -> pd.DataFrame:
    """RULER's results table: one row per label, the average over its tasks (percent, one decimal) per length as
    columns ("4K", "8K", ...), the number of tasks and the effective length on the average. A length where some
    task has no scored sample reads "n/a (no <tasks>)"; one where some task was not run is left out of the
    effective length (see :func:`suite_effective_length`)."""
    avg = suite_average(data)
    eff = suite_effective_length(data, threshold=threshold)
    lengths = sorted(avg["context_length"].unique())
    rows = []
    for label, g in avg.groupby("label", sort=True):
        row: dict[str, Any] = {"label": label, "tasks": int(g["n_tasks"].iloc[0])}
        by_length = {int(r.context_length): r for r in g.itertuples(index=False)}
        for length in lengths:
            r = by_length.get(int(length))
            row[length_label(length)] = ("" if r is None else f"n/a (no {r.missing})" if r.missing
                                         else f"{100 * r.accuracy:.1f}")
        row[f"effective (>= {threshold:g})"] = suite_eff_text(eff[str(label)], g)
        rows.append(row)
    return pd.DataFrame(rows)


def suite_eff_text(eff: int | None, avg: pd.DataFrame) -> str:
    """:func:`_eff_text` of one label's effective length on the average, over the lengths every task ran at."""
    lengths = suite_lengths(avg)
    if not lengths:
        return "n/a (no length that every task ran at)"
    return _eff_text(eff, lengths[0], lengths[-1])


def _eff_text(eff: int | None, shortest: int, longest: int) -> str:
    """RULER's notation: "<4K" when nothing passes, ">=128K" when the longest tested length still passes."""
    if eff is None:
        return f"<{length_label(shortest)}"
    if eff == longest:
        return f">={length_label(eff)}"
    return length_label(eff)
