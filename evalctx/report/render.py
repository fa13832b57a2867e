"""The run report: report.html (self-contained) and report.md (+ plots/*.png) for one or several runs.

Several runs side by side (an FP16 engine vs an INT8-KV engine vs a LoRA engine) share every plot (one line per
label) and every table (a label column). With a baseline, each run is also compared with it cell by cell.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from evalctx import analysis, redact
from evalctx.analysis import length_label
from evalctx.compare import CompareResult, compare, display_table
from evalctx.errors import UsageError
from evalctx.report.document import Document

MAX_MESSAGES = 5


def _fig_to_png(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path


def _acc_text(r: Mapping[str, Any]) -> str:
    if not r["n"]:
        return "n/a"
    return f"{r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def _summary_table(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    s = analysis.summary(df, by=by)
    out = pd.DataFrame({c: s[c] for c in by if c in s.columns})
    if "context_length" in out:
        out["context_length"] = [length_label(x) for x in out["context_length"]]
        out = out.rename(columns={"context_length": "length"})
    if "depth" in out:
        out["depth"] = [f"{d * 100:g}%" for d in s["depth"]]
    out["n"] = s["n"]
    out["accuracy [95% CI]"] = [_acc_text(r) for r in s.to_dict("records")]
    out["errors"] = s["n_error"]
    out["unsupported"] = s["n_unsupported"]
    out["empty"] = s["n_empty"]
    out["latency p50 (s)"] = s["latency_s_p50"]
    out["latency p95 (s)"] = s["latency_s_p95"]
    out["TTFT p50 (s)"] = s["ttft_s_p50"]
    out["prefill tok/s p50"] = ["" if pd.isna(x) else f"{x:,.0f}" for x in s["prefill_tokens_per_s_p50"]]
    if s["n_warm"].any():  # timings above are of cold rows only (results.summary)
        out["warm (not timed)"] = s["n_warm"]
    return out


def _side_by_side(manifests: list[tuple[str, Mapping[str, Any]]], rows: Iterable[tuple[str, Any]]) -> pd.DataFrame:
    """Rows = fields, one column per label; a "differs" column when several runs disagree."""
    table: dict[str, list[Any]] = {"field": []}
    for label, _ in manifests:
        table[label] = []
    for name, getter in rows:
        table["field"].append(name)
        for label, m in manifests:
            table[label].append(getter(m))
    df = pd.DataFrame(table)
    if len(manifests) > 1:
        df["differs"] = ["yes" if len({str(v) for v in r[1:]}) > 1 else "" for r in df.itertuples(index=False)]
    return df


def _run_rows() -> list[tuple[str, Any]]:
    def get(*keys: str) -> Any:
        def f(m: Mapping[str, Any]) -> Any:
            v: Any = m
            for k in keys:
                v = v.get(k) if isinstance(v, Mapping) else None
            return v
        return f
    return [("run_id", get("run_id")), ("status", get("status")), ("stopped by", get("stopped_by")),
            ("error_rate", get("error_rate")),
            ("created_at", get("created_at")),
            ("finished_at", get("finished_at")), ("suite", get("suite", "name")),
            ("backend", get("backend", "backend")), ("model", get("backend", "model")),
            ("tokenizer", get("tokenizer", "name")), ("tokenizer fingerprint", get("tokenizer", "fingerprint")),
            ("versions", get("versions")), ("git_sha", get("git_sha")), ("host", get("host")),
            ("gpus", get("gpus")), ("world", get("world")), ("command", get("command"))]


def _engine_rows(manifests: list[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for part in ("engine", "runtime", "options"):
        keys: list[str] = []
        for _, m in manifests:
            for k in ((m.get("backend") or {}).get(part) or {}):
                if k not in keys:
                    keys.append(k)
        for k in keys:
            rows.append((f"{part}.{k}", lambda m, p=part, k=k: ((m.get("backend") or {}).get(p) or {}).get(k)))
    return rows


def _flag_notes(df: pd.DataFrame) -> list[str]:
    """One line per (label, flag) of scored rows carrying row flags: how many, at which lengths, what it means."""
    from evalctx.records import FLAGS

    if "flags" not in df.columns:
        return []
    ok = df[df["status"] == "ok"]
    notes = []
    for label, g in ok.groupby("label", sort=True):
        found: dict[str, set[int]] = {}
        for flags, length in zip(g["flags"], g["context_length"]):
            for f in (flags if flags is not None else []):
                found.setdefault(str(f), set()).add(int(length))
        for flag, lengths in sorted(found.items()):
            n = sum(1 for flags in g["flags"] if flags is not None and flag in list(flags))
            where = ", ".join(length_label(x) for x in sorted(lengths))
            notes.append(f"{label}: {n} scored samples at {where} are flagged {flag}: "
                         f"{FLAGS.get(flag, 'see the backend documentation')}.")
    return notes


def _errors(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    bad = df[df["status"] != "ok"]
    if bad.empty:
        return pd.DataFrame(), pd.DataFrame()
    counts = (bad.groupby(["label", "task", "context_length", "status"]).size().rename("count").reset_index())
    counts["context_length"] = [length_label(x) for x in counts["context_length"]]
    err = bad.assign(error=bad["error"].fillna("(no message)").map(redact.mask_text) if "error" in bad
                     else "(no message)")
    msgs = (err.groupby(["label", "status", "error"], sort=False)
            .agg(count=("sample_id", "size"), first_sample=("sample_id", "first"),
                 lengths=("context_length", lambda s: ", ".join(length_label(x) for x in sorted(set(s)))))
            .reset_index().sort_values(["label", "count"], ascending=[True, False]))
    msgs = msgs.groupby("label", sort=False).head(MAX_MESSAGES)
    return counts, msgs[["label", "status", "count", "lengths", "error", "first_sample"]]


def write_report(run_dirs: Iterable[str | Path], out_dir: str | Path | None = None,
                 baseline: str | Path | None = None, history: str | Path | None = None,
                 comparisons: Mapping[str, CompareResult] | None = None) -> tuple[Path, Path]:
    """Write report.html and report.md (and plots/*.png) into ``out_dir`` (default: the first run dir).

    ``baseline``: a run dir each run is compared with. ``history``: a nightly history dir whose summary.csv
    gives the trend plot. ``comparisons``: results already computed by the caller (the nightly gate), by run_id,
    so the report shows exactly the verdict that set the exit code."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise UsageError("no run directories given")
    df = analysis.load_runs(dirs)
    out = Path(out_dir) if out_dir is not None else dirs[0]
    plots_dir = out / "plots"
    out.mkdir(parents=True, exist_ok=True)
    from evalctx.report import plots  # lazy: matplotlib is an extra

    run_ids = list(dict.fromkeys(df["run_id"]))
    label_of = dict(zip(df["run_id"], df["label"]))
    # Masked again here: a manifest written before evalctx masked secrets still has them in full.
    manifests = [(label_of[rid], redact.mask_manifest(analysis.load_manifest(d)))
                 for rid, d in zip(run_ids, dirs)]
    labels = list(dict.fromkeys(label_of[r] for r in run_ids))
    tasks = sorted(df["task"].unique())
    title = "evalctx report: " + ", ".join(labels)
    doc = Document(title)
    doc.para(f"Generated {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from "
             + ", ".join(str(d) for d in dirs) + ".")
    for label, m in manifests:
        status = m.get("status") or df.loc[df["label"] == label, "run_status"].iloc[0]
        if status == "complete_with_errors":
            rows = df[df["label"] == label]
            n_err = int((rows["status"] == "error").sum())
            doc.para(f"{label}: run status is 'complete_with_errors': {n_err} of {len(rows)} samples are error rows "
                     f"(above --max-error-rate {m.get('max_error_rate', 0):g}); accuracy is over the scored samples "
                     "only. See \"Errors and unsupported samples\".", css="warn")
        elif status != "complete":
            doc.para(f"{label}: run status is '{status}': results are partial and may miss cells.", css="warn")
    for note in _flag_notes(df):  # e.g. lengths beyond a rotary model's stated window
        doc.para(note, css="warn")

    doc.section("Runs")
    doc.table(_side_by_side(manifests, _run_rows()))
    doc.section("Engine configuration")
    doc.table(_side_by_side(manifests, _engine_rows(manifests)))

    doc.section("Effective length")
    doc.para("Longest context length at which accuracy (pooled over depths) and that of every shorter length "
             f"reaches the threshold: RULER's 85.6% ({analysis.RULER_THRESHOLD:g}) and NoLiMa's "
             f"{analysis.NOLIMA_RELATIVE:g} x the shortest length's accuracy.")
    eff = analysis.effective_length_table(df)
    eff["shortest_accuracy"] = eff["shortest_accuracy"].round(3)
    eff = eff.rename(columns={"shortest_accuracy": "accuracy at shortest", "longest_tested": "longest tested"})
    doc.table(eff.sort_values(["task", "label"]))

    if len(tasks) > 1:
        doc.section("Average over tasks")
        doc.para(f"RULER's headline: the mean over the {len(tasks)} tasks of each task's accuracy (pooled over "
                 "depths) per length, in percent, each task weighted equally; the effective length is the longest "
                 f"length whose average, and every shorter length's, reaches {analysis.RULER_THRESHOLD:g}. A length "
                 "that some task lacks (not run, or no scored sample) has no average.")
        doc.table(analysis.suite_average_table(df))

    doc.section("Accuracy by length")
    doc.table(_summary_table(df, ["task", "context_length", "label"]))

    doc.section("Plots")
    n_plot = 0
    for task in tasks:
        doc.subsection(task)
        png = _fig_to_png(plots.accuracy_vs_length(df, task), plots_dir / f"accuracy_{n_plot:02d}.png")
        doc.image(png, f"{task}: accuracy vs context length", out)
        n_plot += 1
        for label in labels:
            if ((df["task"] == task) & (df["label"] == label)).any():
                png = _fig_to_png(plots.heatmap(df, task, label=label), plots_dir / f"heatmap_{n_plot:02d}.png")
                doc.image(png, f"{task}: depth x length heatmap, {label}", out)
                n_plot += 1
    doc.subsection("Latency")
    png = _fig_to_png(plots.latency_vs_length(df), plots_dir / "latency.png")
    doc.image(png, "TTFT, latency and prefill throughput vs context length", out)
    hist_csv = Path(history) / "summary.csv" if history is not None else None
    if hist_csv is not None and hist_csv.is_file():
        hist = pd.read_csv(hist_csv)
        if hist["run_id"].nunique() >= 2:
            doc.subsection("Nightly trend")
            png = _fig_to_png(plots.trend(hist), plots_dir / "trend.png")
            doc.image(png, "accuracy and latency over nightly runs", out)

    doc.section("Accuracy by length and depth")
    doc.table(_summary_table(df, ["task", "context_length", "depth", "label"]),
              collapsed="Every (task, length, depth) cell")

    doc.section("Errors and unsupported samples")
    counts, msgs = _errors(df)
    if counts.empty:
        doc.para("No error or unsupported samples.")
    else:
        doc.table(counts)
        doc.subsection(f"Messages (the {MAX_MESSAGES} most frequent per label)")
        doc.table(msgs)

    if baseline is not None or comparisons:
        _comparison_section(doc, df, run_ids, label_of, baseline, comparisons or {})

    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(doc.render_html(), encoding="utf-8")
    md_path.write_text(doc.render_md(), encoding="utf-8")
    return html_path, md_path


def _comparison_section(doc: Document, df: pd.DataFrame, run_ids: list[str], label_of: Mapping[str, str],
                        baseline: str | Path | None, comparisons: Mapping[str, CompareResult]) -> None:
    doc.section("Comparison with the baseline")
    base_df = analysis.load_run(baseline) if baseline is not None else None
    if base_df is not None:
        doc.para(f"Baseline: {base_df['label'].iloc[0]} (run {base_df['run_id'].iloc[0]}, {baseline}).")
    for rid in run_ids:
        result = comparisons.get(rid)
        if result is None:
            if base_df is None:
                continue
            result = compare(base_df, df[df["run_id"] == rid])
        doc.subsection(f"{label_of[rid]} (run {rid})")
        doc.para(result.headline(), css="fail" if result.regressed else "pass")
        doc.para(result.settings() + ".")
        notable = result.table[result.table["verdict"] != "ok"]
        if notable.empty:
            doc.para("Every cell is ok.")
        else:
            doc.table(display_table(notable),
                      collapsed=None if len(notable) <= 30 else f"{len(notable)} cells that are not ok")
        doc.table(display_table(result.table), collapsed="All cells")
