"""``evalctx compare BASE CAND``: the regression gate between two run directories (exit 0 pass, 1 regression)."""

from __future__ import annotations

import argparse

from evalctx.errors import UsageError


def add_gate_options(p: argparse.ArgumentParser) -> None:
    """The gate settings, shared with ``nightly-gate`` so both judge the same way."""
    p.add_argument("--alpha", type=float, default=0.05,
                   help="significance level of the one-sided Fisher exact test per cell (default 0.05)")
    p.add_argument("--min-samples", type=int, default=20,
                   help="scored samples a side below which a cell is 'insufficient' (default 20)")
    p.add_argument("--latency-tolerance", type=float, default=0.10,
                   help="allowed rise of the median latency/TTFT per cell, as a fraction (default 0.10)")
    p.add_argument("--latency-min-delta", type=float, default=0.002, metavar="SECONDS",
                   help="a latency rise must also exceed this many seconds (default 0.002: below it is jitter)")
    p.add_argument("--allow-missing", action="store_true",
                   help="cells of the baseline missing from the candidate do not fail the gate")
    p.add_argument("--correction", choices=("holm", "none"), default="holm",
                   help="multiple-testing correction across cells and pooled lengths (default holm: family-wise "
                        "error <= alpha)")
    p.add_argument("--max-error-rate-rise", type=float, default=0.0, metavar="RATE",
                   help="rise of the run's error rate (error + unsupported rows per sample, over the cells both "
                        "runs have) that still passes (default 0: any rise fails, however few samples a cell has)")
    p.add_argument("--allow-different", action="append", default=[], metavar="SETTING[,SETTING]",
                   help="compare although the runs differ in this setting of the measurement (task, prompt_mode, "
                        "max_new_tokens, seed, scorer; repeat the flag or separate with commas); without it such "
                        "a difference is refused (exit 2). Differences of the system under test (model, tokenizer, "
                        "chat template and date, decoding, backend, server) are listed, never refused")
    p.add_argument("--no-pooled", dest="pooled", action="store_false",
                   help="judge cells only: no row per (task, context length) pooled over the depths both runs have "
                        "(pooled rows are on by default; they catch a drop spread thinly over all depths)")


def allowed(args: argparse.Namespace) -> list[str]:
    """The --allow-different settings, repeated flags and comma lists alike."""
    return [x.strip() for v in args.allow_different for x in v.split(",") if x.strip()]


def gate_kwargs(args: argparse.Namespace) -> dict[str, object]:
    if not 0.0 < args.alpha < 1.0:
        raise UsageError(f"--alpha must be between 0 and 1, not {args.alpha}")
    if args.min_samples < 1:
        raise UsageError(f"--min-samples must be >= 1, not {args.min_samples}")
    if args.latency_tolerance < 0:
        raise UsageError(f"--latency-tolerance must be >= 0, not {args.latency_tolerance}")
    if args.latency_min_delta < 0:
        raise UsageError(f"--latency-min-delta must be >= 0, not {args.latency_min_delta}")
    if not 0.0 <= args.max_error_rate_rise <= 1.0:
        raise UsageError(f"--max-error-rate-rise must be a share between 0 and 1, not {args.max_error_rate_rise}")
    return {"alpha": args.alpha, "min_samples": args.min_samples, "latency_tolerance": args.latency_tolerance,
            "latency_min_delta_s": args.latency_min_delta, "allow_missing": args.allow_missing,
            "correction": args.correction, "pooled": args.pooled, "max_error_rate_rise": args.max_error_rate_rise}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare", help="compare a candidate run with a baseline run, cell by cell (exit 1 on regression)",
        description="Compare CAND with BASE per (task, context_length, depth) cell, and per (task, "
                    "context_length) pooled over the depths both runs have: accuracy (one-sided Fisher exact "
                    "test), error rate, median latency and TTFT, and coverage. Exit 0: no regression, "
                    "1: regression, 2: bad input.")
    p.add_argument("base", metavar="BASE", help="baseline run directory")
    p.add_argument("cand", metavar="CAND", help="candidate run directory")
    add_gate_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a Markdown table")
    p.add_argument("--only-notable", action="store_true", help="list only the cells that are not ok")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from evalctx.analysis.runs import load_manifest, load_run
    from evalctx.analysis.comparability import check, check_runs, differences
    from evalctx.analysis.compare import compare

    kwargs = gate_kwargs(args)
    base_manifest, cand_manifest = load_manifest(args.base), load_manifest(args.cand)
    unfinished = check_runs(args.base, args.cand, cand_manifest, base_manifest)
    base, cand = load_run(args.base), load_run(args.cand)
    diffs = differences(base_manifest, base, cand_manifest, cand)
    check(diffs, allowed(args))
    result = compare(base, cand, **kwargs)  # type: ignore[arg-type]
    result.differences = diffs
    for problem in unfinished:
        result.add_problem(problem)
    if args.json:
        print(result.to_json())
    else:
        print(result.to_markdown(only_notable=args.only_notable), end="")
    return 1 if result.regressed else 0
