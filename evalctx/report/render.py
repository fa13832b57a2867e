"""The run report: report.html (self-contained) and report.md (+ plots/*.png) for one or several runs.

Results come first (the effective length and the accuracy per length, the heatmaps, the curves, wrong answers,
latency, the comparison), the metadata after (the settings actually used, the runs, every option as given).
Several runs side by side (an FP16 engine vs an INT8-KV engine vs a LoRA engine) share every plot (one line per
label) and every table (a label column). With a baseline, each run is also compared with it cell by cell and a
difference heatmap drawn per task; two runs without a baseline get the difference heatmap of the second against
the first.
"""

from __future__ import annotations

import datetime as _dt
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from evalctx import redact

from evalctx.analysis import runs as analysis
from evalctx.analysis.runs import length_label
from evalctx.analysis.compare import CompareResult, compare, display_table
from evalctx.errors import UsageError
from evalctx.report import metadata, samples
from evalctx.report.document import Document
from evalctx.report.figures import seconds_text

# The plot kinds this module writes into plots/ (a stale file of one of these kinds is removed).
PLOT_KINDS = ("heatmap", "difference", "accuracy", "latency", "trend")


class PlotFiles:
    """File names for the report's plots, from what they show: ``heatmap_passkey.png``,
    ``heatmap_passkey_fp16.png`` with several labels, ``difference_passkey_int8kv-vs-fp16.png``.

    Task names and labels are user text, so each part keeps ASCII letters, digits, ``.``, ``_`` and ``-`` (accents
    dropped, any run of other characters one ``-``, at most 60 characters); two plots that would get one name
    (also when it differs in case only, for a case-insensitive disk) get ``-2``, ``-3``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.written: list[Path] = []
        self._used: set[str] = set()

    @staticmethod
    def part(text: str) -> str:
        ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
        text = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_text))
        return text.strip("-._")[:60].strip("-._") or "x"

    def path(self, kind: str, *parts: str) -> Path:
        stem = "_".join([kind, *(self.part(p) for p in parts)])
        name, i = stem, 2
        while name.lower() in self._used:
            name, i = f"{stem}-{i}", i + 1
        self._used.add(name.lower())
        return self.folder / f"{name}.png"

    def save(self, fig: Any, path: Path) -> Path:
        from evalctx.report.figures import save

        save(fig, path)
        self.written.append(path)
        return path

    def remove_stale(self) -> None:
        """Plots of an earlier report into the same folder that this one did not draw (another label, task, or
        the numbered names of earlier versions): left there, they would read as part of this report."""
        keep = {p.name for p in self.written}
        for p in self.folder.glob("*.png"):
            if p.name not in keep and p.name.split("_")[0].split(".")[0] in PLOT_KINDS:
                p.unlink(missing_ok=True)


@dataclass
class Pair:
    """Two runs whose difference the report draws: ``cand`` against the reference ``base``."""
    base: pd.DataFrame
    cand: pd.DataFrame
    result: CompareResult
    warning: str | None


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
    # One format down a column, the unit in each cell ("108 µs", "281 ms", "1.44 s"): 4 significant digits put
    # "2.17e-05" under "0.0001203".
    for col, key in (("latency p50", "latency_s_p50"), ("latency p95", "latency_s_p95"), ("TTFT p50", "ttft_s_p50")):
        out[col] = ["" if pd.isna(x) else seconds_text(float(x), significant=3) for x in s[key]]
    out["prefill tok/s p50"] = ["" if pd.isna(x) else f"{x:,.0f}" for x in s["prefill_tokens_per_s_p50"]]
    if s["n_warm"].any():  # timings above are of cold rows only (results.summary)
        out["warm (not timed)"] = s["n_warm"]
    return out


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


def _headline_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, label): accuracy in percent (pooled over depths) with its n per length, then the
    effective length by RULER's threshold and by NoLiMa's relative one."""
    acc = analysis.length_accuracy(df)
    eff = analysis.effective_length_table(df).set_index(["label", "task"])
    ruler, nolima = (f"effective (>= {analysis.RULER_THRESHOLD:g})",
                     f"effective (>= {analysis.NOLIMA_RELATIVE:g} x shortest)")
    lengths = sorted(int(x) for x in acc["context_length"].unique())
    rows = []
    for (task, label), g in acc.groupby(["task", "label"], sort=True):
        row: dict[str, Any] = {"task": task, "label": label}
        by_length = {int(r.context_length): r for r in g.itertuples(index=False)}
        for length in lengths:
            r = by_length.get(length)
            row[length_label(length)] = ("" if r is None else "n=0" if not r.n
                                         else f"{100 * r.accuracy:.1f}% (n={int(r.n)})")
        row[f"effective (≥ {100 * analysis.RULER_THRESHOLD:g}%)"] = _ge(eff.loc[(label, task), ruler])
        row[f"effective (≥ {analysis.NOLIMA_RELATIVE:g} × shortest)"] = _ge(eff.loc[(label, task), nolima])
        rows.append(row)
    return pd.DataFrame(rows)


def _ge(text: Any) -> Any:
    """RULER's ">=128K" as "≥128K": one character, and no markup character in report.md."""
    return text.replace(">=", "≥") if isinstance(text, str) else text


def _status_notes(doc: Document, df: pd.DataFrame, manifests: list[tuple[str, Mapping[str, Any]]]) -> None:
    """A warning per run that is not simply complete, and one per row flag: they qualify every number below."""
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


def _pairs(df: pd.DataFrame, run_ids: list[str], manifests: Mapping[str, Mapping[str, Any]],
           baseline: str | Path | None, comparisons: Mapping[str, CompareResult]) -> tuple[list[Pair], str]:
    """The runs to draw differences for, and a sentence saying which: each run against ``baseline``; else, with
    exactly two runs, the second against the first. The gate's result comes from ``comparisons`` where the caller
    has it (the nightly gate), else :func:`compare` with its defaults."""
    if baseline is not None:
        base = analysis.load_run(baseline)
        base_manifest = redact.mask_manifest(analysis.load_manifest(baseline))
        cands = [rid for rid in run_ids if rid != base["run_id"].iloc[0]]
        how = f"each run against the baseline {base['label'].iloc[0]} (run {base['run_id'].iloc[0]})"
    elif len(run_ids) == 2:
        base = df[df["run_id"] == run_ids[0]]
        base_manifest, cands = manifests[run_ids[0]], run_ids[1:]
        cand_label = df.loc[df["run_id"] == run_ids[1], "label"].iloc[0]
        how = f"{base['label'].iloc[0]} is the reference (the first run given), {cand_label} the candidate"
    else:
        return [], ""
    pairs = []
    for rid in cands:
        cand = df[df["run_id"] == rid]
        result = comparisons.get(rid) or compare(base, cand)
        if not result.differences:
            from evalctx.analysis.comparability import differences

            result.differences = differences(base_manifest, base, manifests[rid], cand)
        b, c = base, cand
        if b["label"].iloc[0] == c["label"].iloc[0]:  # the same model twice: plots name the runs apart
            b, c = (x.assign(label=x["label"] + " (" + x["run_id"] + ")") for x in (b, c))
        pairs.append(Pair(b, c, result, _differences_text(result)))
    return pairs, how


def _differences_text(result: CompareResult) -> str | None:
    """The runs' differences besides their cells (:mod:`evalctx.analysis.comparability`) as one sentence, or None."""
    from evalctx.analysis.comparability import lines as difference_lines

    if not result.differences:
        return None
    return ("differs from the reference (reference / this run): "
            + "; ".join(x.removeprefix("- ") for x in difference_lines(result.differences)))


def write_report(run_dirs: Iterable[str | Path], out_dir: str | Path | None = None,
                 baseline: str | Path | None = None, history: str | Path | None = None,
                 comparisons: Mapping[str, CompareResult] | None = None) -> tuple[Path, Path]:
    """Write report.html and report.md (and plots/*.png) into ``out_dir`` (default: the first run dir).

    ``baseline``: a run dir each run is compared with. ``history``: a nightly history dir whose summary.csv
    gives the trend plot. ``comparisons``: results already computed by the caller (the nightly gate), by run_id,
    so the report shows exactly the verdict that set the exit code. Raises UsageError for a missing or unreadable
    run dir, or matplotlib missing."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise UsageError("no run directories given")
    df = analysis.load_runs(dirs)
    out = Path(out_dir) if out_dir is not None else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    from evalctx.report import plots  # lazy: matplotlib is an extra

    run_ids = list(dict.fromkeys(df["run_id"]))
    label_of = dict(zip(df["run_id"], df["label"]))
    # Masked again here: a manifest written before evalctx masked secrets still has them in full.
    by_run = {rid: redact.mask_manifest(analysis.load_manifest(d)) for rid, d in zip(run_ids, dirs)}
    manifests = [(label_of[rid], by_run[rid]) for rid in run_ids]
    labels = list(dict.fromkeys(label_of[r] for r in run_ids))
    tasks = sorted(df["task"].unique())
    pairs, pairs_how = _pairs(df, run_ids, by_run, baseline, comparisons or {})
    files = PlotFiles(out / "plots")

    doc = Document("evalctx report: " + ", ".join(labels))
    doc.para(f"Generated {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from "
             + ", ".join(str(d) for d in dirs) + ".")
    _status_notes(doc, df, manifests)

    doc.section("Effective length")
    doc.para(f"Accuracy per context length in percent of the scored samples (pooled over depths; n scored "
             f"samples). The effective length is the longest length at which accuracy, and that at every shorter "
             f"length, reaches the threshold: RULER's 85.6% and NoLiMa's {analysis.NOLIMA_RELATIVE:g} x the "
             "accuracy at the shortest length. \"≥\" means the longest length tested still passes, \"<\" that "
             "even the shortest fails.")
    doc.table(_headline_table(df))
    if len(tasks) > 1:
        doc.section("Average over tasks")
        doc.para(f"RULER's headline: the mean over the {len(tasks)} tasks of each task's accuracy (pooled over "
                 "depths) per length, in percent, each task weighted equally; the effective length is the longest "
                 f"length whose average, and every shorter length's, reaches {100 * analysis.RULER_THRESHOLD:g}%. "
                 "A length that some task lacks (not run, or no scored sample) has no average; one that some task "
                 "is not run at is skipped by the effective length (no scored sample fails it).")
        avg = analysis.suite_average_table(df)
        ruler = f"effective (>= {analysis.RULER_THRESHOLD:g})"
        avg[ruler] = avg[ruler].map(_ge)
        doc.table(avg.rename(columns={ruler: f"effective (≥ {100 * analysis.RULER_THRESHOLD:g}%)"}))

    doc.section("Heatmaps")
    doc.para("Accuracy per needle depth (0% = the start of the context) and context length: percent of the scored "
             "samples, n under it. Hatched cells have no scored sample and say why.")
    if pairs:
        doc.para("Difference heatmaps: candidate minus reference accuracy per cell in percentage points, both "
                 f"accuracies under it; {pairs_how}. ▼ / ▲ mark the cells the regression gate (evalctx compare, "
                 "one-sided Fisher exact test, Holm-adjusted) finds significantly worse / better.")
    for pair in pairs:
        if pair.warning:
            doc.para(f"{pair.cand['label'].iloc[0]}: {pair.warning}.", css="warn")
    for task in tasks:
        doc.subsection(task)
        for label in labels:
            if ((df["task"] == task) & (df["label"] == label)).any():
                parts = (task,) if len(labels) == 1 else (task, label)
                png = files.save(plots.heatmap(df, task, label=label), files.path("heatmap", *parts))
                doc.image(png, f"{task}: depth x length heatmap, {label}", out, half=True)
        for pair in pairs:
            if (pair.base["task"] == task).any() or (pair.cand["task"] == task).any():
                names = [str(x["label"].iloc[0]) for x in (pair.cand, pair.base)]
                png = files.save(plots.difference_heatmap(pair.base, pair.cand, task, result=pair.result),
                                 files.path("difference", task, "-vs-".join(map(files.part, names))))
                doc.image(png, f"{task}: difference heatmap, {names[0]} minus {names[1]}", out, half=True)

    doc.section("Accuracy vs context length")
    for task in tasks:
        png = files.save(plots.accuracy_vs_length(df, task), files.path("accuracy", task))
        doc.image(png, f"{task}: accuracy vs context length", out)
    doc.table(_summary_table(df, ["task", "context_length", "label"]))

    _wrong_answers_section(doc, df, dirs, run_ids, label_of)

    doc.section("Latency")
    _, what = plots.latency_rows(df)
    doc.para(what + " TTFT is the time to the first generated token (the prefill), latency the whole request.")
    png = files.save(plots.latency_vs_length(df), files.path("latency"))
    doc.image(png, "TTFT, latency and prefill throughput vs context length", out)
    hist_csv = Path(history) / "summary.csv" if history is not None else None
    if hist_csv is not None and hist_csv.is_file():
        try:
            hist = pd.read_csv(hist_csv, on_bad_lines="skip")  # a torn line of a killed append is left out
        except (pd.errors.ParserError, ValueError) as exc:
            doc.para(f"Nightly trend not drawn: {hist_csv} cannot be read ({str(exc).splitlines()[0]}).",
                     css="warn")
            hist = pd.DataFrame({"run_id": []})
        if "run_id" in hist and hist["run_id"].nunique() >= 2:
            doc.subsection("Nightly trend")
            png = files.save(plots.trend(hist), files.path("trend"))
            doc.image(png, "accuracy and latency over nightly runs", out)

    if baseline is not None or comparisons:
        _comparison_section(doc, df, run_ids, label_of, baseline, comparisons or {}, pairs)

    doc.section("Errors and unsupported samples")
    counts, msgs = samples.error_tables(df)
    if counts.empty:
        doc.para("No error or unsupported samples.")
    else:
        doc.table(counts)
        doc.subsection(f"Messages (the {samples.MAX_MESSAGES} most frequent per label)")
        doc.table(msgs)

    doc.section("Accuracy by length and depth")
    doc.table(_summary_table(df, ["task", "context_length", "depth", "label"]),
              collapsed="Every (task, length, depth) cell")

    doc.section("Settings used")
    doc.para("What each run ran with, as the backend resolved it (an option left at auto shows what it became).")
    doc.table(metadata.settings_table(manifests))
    doc.section("Runs")
    doc.table(metadata.run_table(manifests))
    doc.section("Engine configuration and options")
    doc.para("Every engine field, runtime setting and backend option as recorded in the manifest.")
    doc.table(metadata.options_table(manifests))

    files.remove_stale()
    html_path, md_path = out / "report.html", out / "report.md"
    # Temporary name and rename: a kill or a full disk never leaves a cut report where a whole one was.
    from evalctx.results.rundir import StorageError, atomic_file

    try:
        for path, text in ((html_path, doc.render_html()), (md_path, doc.render_md())):
            with atomic_file(path) as fh:
                fh.write(text)
    except StorageError as exc:
        raise UsageError(f"cannot write the report: {exc}") from None
    return html_path, md_path


def _wrong_answers_section(doc: Document, df: pd.DataFrame, dirs: list[Path], run_ids: list[str],
                           label_of: Mapping[str, str]) -> None:
    doc.section("Wrong answers")
    table, n_failing = samples.wrong_answers(df)
    if table.empty:
        doc.para("Every scored sample was answered right." if (df["status"] == "ok").any() else
                 "No sample was scored, so none can be wrong: see Errors and unsupported samples.")
        return
    n_cells = table[["label", "task", "length", "depth"]].drop_duplicates().shape[0]
    more = f" ({n_failing - n_cells} more failing cells are not listed)" if n_failing > n_cells else ""
    doc.para(f"Up to {samples.WRONG_PER_CELL} wrong answers in each of {n_cells} failing cells, the worst of "
             f"each task chosen first{more}; the completion is quoted as the model wrote it, cut at "
             f"{samples.MAX_ANSWER_CHARS} characters. The command \"evalctx show RUN_DIR SAMPLE_ID\" prints a "
             "sample with its prompt; run dirs: "
             + ", ".join(f"{label_of[r]}: {d}" for r, d in zip(run_ids, dirs)) + ".")
    doc.table(table, collapsed=None if len(table) <= 30 else f"{len(table)} wrong answers")


def _comparison_section(doc: Document, df: pd.DataFrame, run_ids: list[str], label_of: Mapping[str, str],
                        baseline: str | Path | None, comparisons: Mapping[str, CompareResult],
                        pairs: list[Pair]) -> None:
    doc.section("Comparison with the baseline")
    if pairs:
        base = pairs[0].base
        doc.para(f"Baseline: {base['label'].iloc[0]} (run {base['run_id'].iloc[0]}"
                 + (f", {baseline}" if baseline is not None else "") + ").")
    by_run = {str(p.cand["run_id"].iloc[0]): p.result for p in pairs}
    for rid in run_ids:
        result = comparisons.get(rid) or by_run.get(rid)
        if result is None:
            continue
        doc.subsection(f"{label_of[rid]} (run {rid})")
        doc.para(result.headline(), css="fail" if result.regressed else "pass")
        doc.para(result.settings() + ".")
        if result.differences:
            doc.para(_differences_text(result) + ".",  # type: ignore[operator]
                     css="warn" if any(d.measurement for d in result.differences) else None)
        notable = result.table[result.table["verdict"] != "ok"]
        if notable.empty:
            doc.para("Every cell is ok.")
        else:
            doc.table(display_table(notable),
                      collapsed=None if len(notable) <= 30 else f"{len(notable)} cells that are not ok")
        doc.table(display_table(result.table), collapsed="All cells")
