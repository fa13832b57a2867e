"""``evalctx show RUN SAMPLE_ID``: one sample's prompt (head, needle region, tail), target, completion and score.

The prompt comes from the run's prompt log (``evalctx run --log-samples``) or, without one, is built again from the
suite and tokenizer recorded in the manifest; prompts are deterministic, and the rebuilt one is shown only when its
SHA-1 equals the one the run recorded.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from evalctx.errors import LengthError, UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("show", help="print one sample: prompt (head, needle region, tail), target, completion",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("sample_id", metavar="SAMPLE_ID", nargs="?", default=None,
                   help="a sample_id of the run, or a unique prefix of one; without it, the first sample (by task, "
                        "length, depth, id) that the options below select")
    p.add_argument("--task", default=None, help="select: this task (the suite entry's name, the task column)")
    p.add_argument("--length", type=int, default=None, help="select: this context length in tokens")
    p.add_argument("--depth", type=float, default=None, help="select: this depth, a fraction 0..1")
    p.add_argument("--wrong", action="store_true", help="select: a scored sample whose score is below 1")
    p.add_argument("--full", action="store_true", help="the whole prompt (as much of it as the log holds)")
    return p


def _find(df: Any, args: argparse.Namespace) -> tuple[Any, int]:
    """The selected row and how many matched (several only without SAMPLE_ID)."""
    hits = df
    if args.task is not None:
        names = sorted(df["task"].astype(str).unique())
        if args.task not in names:
            raise UsageError(f"--task {args.task}: no such task in this run; its tasks (suite entry names): "
                             f"{', '.join(names)}{_entries_of(df, args.task)}")
        hits = hits[hits["task"] == args.task]
    if args.length is not None:
        hits = hits[hits["context_length"] == args.length]
    if args.depth is not None:
        hits = hits[(hits["depth"] - args.depth).abs() < 1e-6]
    if args.wrong:
        hits = hits[(hits["status"] == "ok") & (hits["score"] < 1.0)]
    if args.sample_id is not None:
        hits = hits[hits["sample_id"].astype(str).str.startswith(args.sample_id)]
        if hits["sample_id"].nunique() > 1:
            raise UsageError(f"sample id prefix {args.sample_id!r} matches {hits['sample_id'].nunique()} samples: "
                             "give more of it")
    if hits.empty:
        some = ", ".join(df["sample_id"].astype(str).head(3))
        raise UsageError(f"no sample in this run matches {_selection(args)} (its sample ids look like: {some})")
    hits = hits.sort_values(["task", "context_length", "depth", "sample_id"])
    return hits.iloc[0], len(hits)


def _entries_of(df: Any, task_type: str) -> str:
    """A hint when ``task_type`` is the task of some named entries (``niah_single`` for ``niah_single_1``)."""
    if "task_type" not in df.columns:
        return ""
    entries = sorted(df.loc[df["task_type"] == task_type, "task"].astype(str).unique())
    return f" ({task_type} is the task of {', '.join(entries)})" if entries else ""


def _selection(args: argparse.Namespace) -> str:
    parts = [f"id {args.sample_id!r}" if args.sample_id is not None else ""]
    parts += [f"{k} {getattr(args, k)}" for k in ("task", "length", "depth") if getattr(args, k) is not None]
    parts += ["--wrong" if args.wrong else ""]
    return ", ".join(p for p in parts if p) or "(no selection)"


_UNBUILDABLE = "the run built none either: no prompt of this exact length fits this sample"


def _rebuild(manifest: dict[str, Any], row: Any, full: bool) -> dict[str, Any] | str:
    """The sample's prompt record built again from the manifest, or why it cannot be."""
    from evalctx.config import Suite, TaskSpec
    from evalctx.results.prompts import prompt_record
    from evalctx.run.sampling import SampleBuilder
    from evalctx.models.tokenizer import load_tokenizer

    tok_info = manifest.get("tokenizer") or {}
    suite_json = manifest.get("suite") or {}
    try:
        suite = Suite(**{**suite_json, "tasks": [TaskSpec(**t) for t in suite_json.get("tasks", [])]})
    except TypeError:
        return "the manifest's suite is from another evalctx version"
    try:
        tok = load_tokenizer(str(tok_info.get("name")))
    except UsageError as exc:
        return f"its tokenizer cannot be loaded here ({exc})"
    if tok.fingerprint() != tok_info.get("fingerprint"):
        return f"the tokenizer at {tok_info.get('name')} is not the one the run used (fingerprint differs)"
    from evalctx.models.chat_identity import pinned_date, uses_date

    template = manifest.get("chat_template") or {}
    tok.chat_date = pinned_date(manifest, None)  # the day the run's chat prompts were rendered for
    builder = SampleBuilder(suite, tok)
    spec = next((s for s in builder.specs() if s.id == row["sample_id"]), None)
    if spec is None:
        if uses_date(tok) and not template.get("date"):
            return ("its chat template writes the date, and this run predates evalctx pinning it: the day its "
                    "prompts were rendered for is not recorded")
        return "the suite in the manifest does not yield this sample id (another evalctx version?)"
    try:
        sample = builder.build(spec)
    except LengthError as exc:  # an unsupported row the run could not build either: it has no prompt
        return f"{_UNBUILDABLE} ({exc})"
    if hashlib.sha1(sample.prompt.encode("utf-8")).hexdigest() != row.get("prompt_sha1"):
        return "the prompt built again differs from the run's (SHA-1 mismatch: another evalctx version?)"
    return prompt_record(sample, "full" if full else "excerpt", tok)


# Integer columns that pandas reads as float when some row has none (an error row's n_output_tokens).
_COUNTS = ("n_output_tokens", "n_prompt_tokens", "needle_token_index", "seed")


def _value(row: Any, key: str) -> Any:
    v = row.get(key)
    if hasattr(v, "tolist") and getattr(v, "ndim", 0):  # a list column (target) arrives as a numpy array
        return [str(x) for x in v.tolist()]
    if v is None or (isinstance(v, float) and v != v):
        return None
    if key in _COUNTS:
        # 7, not 7.0; a negative needle index is the "no needle placed" of a row whose prompt was never built
        return None if key == "needle_token_index" and v < 0 else int(v)
    return v


def main(args: argparse.Namespace) -> int:
    from evalctx.analysis.runs import load_manifest, load_run
    from evalctx.results.prompts import read_prompts, render

    run_dir = Path(args.run)
    row, n_match = _find(load_run(run_dir), args)
    depth = _value(row, "depth")
    actual = _value(row, "depth_actual")
    more = f" (the first of {n_match} that match {_selection(args)})" if n_match > 1 else ""
    print(f"sample {row['sample_id']} of run {row['run_id']}{more}")
    shaped = _value(row, "meta_shape") == "upstream"
    level = (f"level {int(row['context_length']):,} (upstream-shaped: the prompt is "
             f"{_value(row, 'meta_prompt_tokens'):,} tokens)" if shaped else
             f"context_length {int(row['context_length']):,} tokens")
    print(f"task {row['task']}, {level}, depth "
          f"{'' if depth is None else f'{100 * depth:g}%'}"
          f"{'' if actual is None else f' (actual {100 * actual:.1f}%)'}, needle at token "
          f"{_value(row, 'needle_token_index')}, prompt_mode {_value(row, 'prompt_mode')}, seed {_value(row, 'seed')}")
    print(f"status {row['status']}, score {_value(row, 'score')}, finish_reason {_value(row, 'finish_reason')}, "
          f"n_output_tokens {_value(row, 'n_output_tokens')}")
    for key in ("target", "completion", "extracted", "error"):
        if _value(row, key) is not None or key != "error":
            print(f"{key + ':':<12}{_value(row, key)!r}")
    record = read_prompts(run_dir).get(row["sample_id"])
    source = "from the run's prompt log"
    if record is None:
        got = _rebuild(load_manifest(run_dir), row, args.full)
        if isinstance(got, str):
            lead = "none" if got.startswith(_UNBUILDABLE) else "not logged (run with --log-samples to keep it) " \
                "and not rebuilt"
            print(f"\nprompt: {lead}: {got}")
            return 0
        record, source = got, "built again from the manifest's suite and tokenizer, SHA-1 verified"
    needles = ", ".join(f"{c:,}" for c in record["needle_chars"]) or "not found"
    print(f"\nprompt: {record['prompt_chars']:,} characters, needle at character {needles} ({source})")
    print("-" * 100)
    print(render(record, full=args.full))
    print("-" * 100)
    return 0
