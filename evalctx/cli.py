"""The ``evalctx`` command: run, generate, tasks, plus plan/report/compare/nightly-gate/serve/show from their own
modules.

Bad input is one line on stderr and exit 2, never a traceback. Under mpirun only world rank 0 prints.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from evalctx.errors import UsageError

# Subcommands that live in their own module: (name, module). Each module has add_parser(sub) and main(args).
COMMAND_MODULES = [
    ("plan", "evalctx.commands.plan"),
    ("report", "evalctx.commands.report"),
    ("compare", "evalctx.commands.compare"),
    ("nightly-gate", "evalctx.commands.nightly"),
    ("serve", "evalctx.commands.serve"),
    ("show", "evalctx.commands.show"),
]

DEFAULT_SUITE = "default"
DEFAULT_MODEL = "tiny"


def _is_root_rank() -> bool:
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(var, "0") not in ("0", ""):
            return False
    return True


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="evaluate a model on a suite and write results/<run_id>/",
                       description="Evaluate a model on a suite. With no arguments: the embedded tiny model on "
                                   "the default suite through the hf backend. Rerunning the same command resumes.")
    p.add_argument("--suite", default=None, help=f"suite name or .toml path (default: {DEFAULT_SUITE})")
    p.add_argument("--backend", default=None, help="fake | hf | trtllm | http (default: the suite's, else hf)")
    p.add_argument("--model", "--engine-dir", dest="model", default=None,
                   help=f"model dir, engine dir, server model name or embedded name (default: {DEFAULT_MODEL})")
    p.add_argument("--tokenizer", "--tokenizer-dir", dest="tokenizer", default=None,
                   help="tokenizer dir, embedded model name or 'byte' (default: the model dir; for the fake "
                        f"backend without a model: {DEFAULT_MODEL}'s)")
    p.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="one backend option per flag, repeatable (e.g. --backend-opt chunk_size=8192)")
    p.add_argument("--out", default="results", help="parent folder of run dirs (default: results)")
    p.add_argument("--run-id", default=None, help="run dir name (default: derived from the configuration, "
                                                  "so the same command resumes the same run)")
    p.add_argument("--label", default=None, help="name of this model/engine variant in reports")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="override every task's lengths")
    p.add_argument("--samples", type=int, default=None, help="override samples per cell")
    p.add_argument("--prompt-mode", choices=("raw", "chat"), default=None, help="override every task's mode")
    p.add_argument("--tasks", nargs="+", metavar="NAME", default=None,
                   help="run only these tasks of the suite (names as `evalctx tasks` lists them)")
    p.add_argument("--log-samples", nargs="?", const="excerpt", choices=("excerpt", "full"), default=None,
                   help="also keep the prompts in RUN_DIR/prompts/: 'excerpt' (the default) keeps a prompt of up "
                        "to 8000 characters whole and a longer one as head, needle region and tail; 'full' keeps "
                        "every prompt whole. `evalctx show RUN SAMPLE_ID` prints one")
    p.add_argument("--no-retry-errors", action="store_true", help="on resume, keep earlier error rows")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="write a suite's samples as JSON lines (no model needed)")
    p.add_argument("--suite", default=DEFAULT_SUITE)
    p.add_argument("--tokenizer", default=DEFAULT_MODEL, help="tokenizer dir, embedded model name or 'byte'")
    p.add_argument("--out", required=True, help="output .jsonl file ('-' for stdout)")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--prompt-mode", choices=("raw", "chat"), default=None)
    p.add_argument("--tasks", nargs="+", metavar="NAME", default=None, help="only these tasks of the suite")
    p.add_argument("--with-ids", action="store_true", help="include prompt_ids")
    p.add_argument("--no-progress", action="store_true")


def _overrides(suite, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if args.tasks:
        have = list(dict.fromkeys(t.task for t in suite.tasks))
        unknown = [n for n in args.tasks if n not in have]
        if unknown:
            raise UsageError(f"--tasks: {', '.join(unknown)} not in suite {suite.name} (it has: {', '.join(have)})")
        suite.tasks = [t for t in suite.tasks if t.task in args.tasks]
    for t in suite.tasks:
        if args.lengths:
            t.lengths = list(args.lengths)
        if args.samples:
            if args.samples < 1:
                raise UsageError("--samples must be >= 1")
            t.samples = args.samples
        if args.prompt_mode:
            t.prompt_mode = args.prompt_mode
    return suite


def cmd_run(args: argparse.Namespace) -> int:
    from evalctx.backends.base import parse_kv_flags
    from evalctx.config import load_suite
    from evalctx.runner import RunConfig, Runner

    suite = _overrides(load_suite(args.suite or DEFAULT_SUITE), args)
    backend = args.backend or suite.backend or "hf"
    model = args.model or suite.model or (DEFAULT_MODEL if backend == "hf" else None)
    tokenizer = args.tokenizer
    if tokenizer is None and backend in ("fake", "fake-tp") and model is None:
        tokenizer = DEFAULT_MODEL  # the tokenizer the default suite's lengths are sized for
    cfg = RunConfig(
        suite=suite, backend=backend, backend_options=parse_kv_flags(args.backend_opt), model=model,
        tokenizer=tokenizer, out_dir=Path(args.out), run_id=args.run_id, label=args.label,
        batch_size=args.batch_size, retry_errors=not args.no_retry_errors, progress=not args.no_progress,
        command=shlex.join(["evalctx", *sys.argv[1:]]), log_samples=args.log_samples,
    )
    runner = Runner(cfg)
    outcome = runner.run()
    if not runner.world.is_root:
        return 0
    import pandas as pd

    from evalctx.results.table import format_summary

    df = pd.read_parquet(outcome.run_dir / "results.parquet")
    if args.json:
        print(outcome.summary.to_json(orient="records"))
    else:
        print(format_summary(df))
        print(f"\nrun {runner.run_id}: {outcome.status}, {outcome.n_new} new of {outcome.n_total} samples "
              f"-> {outcome.run_dir}")
    from evalctx.status import exit_code

    return exit_code(outcome.status)


def _size(n_bytes: float) -> str:
    if n_bytes < 1e6:
        return f"{n_bytes / 1e3:.1f} kB"
    return f"{n_bytes / 1e6:,.0f} MB" if n_bytes >= 10e6 else f"{n_bytes / 1e6:.1f} MB"


def cmd_generate(args: argparse.Namespace) -> int:
    from evalctx.config import load_suite
    from evalctx.progress import Progress
    from evalctx.sampling import SampleBuilder
    from evalctx.tokenizer import load_tokenizer

    suite = _overrides(load_suite(args.suite), args)
    tok = load_tokenizer(args.tokenizer)
    builder = SampleBuilder(suite, tok)
    specs = builder.specs()
    n_tokens = sum(s.context_length for s in specs)

    def record(spec) -> dict:  # type: ignore[no-untyped-def]
        return builder.build(spec).to_json(with_ids=args.with_ids)

    # Said before the work: a 1M-token suite takes minutes and hundreds of MB. From the shortest sample: its
    # prompt (and ids) bytes per token, scaled to every length, plus its other fields once per line.
    shortest = min(specs, key=lambda s: s.context_length, default=None)
    if shortest is not None:
        rec = record(shortest)
        per_len = len(json.dumps(rec["prompt"])) + len(json.dumps(rec.get("prompt_ids", "")))
        fixed = len(json.dumps(rec)) + 1 - per_len
        est = fixed * len(specs) + per_len / shortest.context_length * n_tokens
        print(f"evalctx: generating {len(specs)} samples, {n_tokens:,} prompt tokens, about {_size(est)} -> "
              f"{args.out}", file=sys.stderr, flush=True)
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")
    progress = Progress(len(specs), n_tokens, enabled=not args.no_progress)
    written = 0
    try:
        for spec in specs:
            text = json.dumps(record(spec)) + "\n"
            out.write(text)
            written += len(text.encode("utf-8"))
            progress.update(1, spec.context_length)
    finally:
        progress.close()
        if out is not sys.stdout:
            out.close()
    print(f"evalctx: wrote {len(specs)} samples ({_size(written)}) to {args.out}", file=sys.stderr)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from evalctx.config import list_suites
    from evalctx.tasks import list_tasks

    print("tasks:")
    for name, desc in list_tasks():
        print(f"  {name:<18} {desc}")
    print("\nsuites (tasks/*.toml here, then the package's):")
    for name, desc, path in list_suites():
        print(f"  {name:<18} {desc}  [{path}]")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="evalctx", description="Token-exact long-context evaluation of LLMs.")
    parser.add_argument("--version", action="version", version=f"evalctx {__import__('evalctx').__version__}")
    sub = parser.add_subparsers(dest="command")
    _add_run(sub)
    _add_generate(sub)
    sub.add_parser("tasks", help="list tasks and suites")
    handlers: dict[str, object] = {"run": cmd_run, "generate": cmd_generate, "tasks": cmd_tasks}
    for name, module in COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue  # that part is not built yet
            raise
        mod.add_parser(sub)
        handlers[name] = mod.main
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["run"]  # `evalctx` alone runs the default evaluation
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(handlers[args.command](args) or 0)  # type: ignore[operator]
    except UsageError as exc:
        from evalctx.dist import abort_if_distributed

        rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK")
        if _is_root_rank() or "mpi4py.MPI" in sys.modules:
            where = f" (rank {rank})" if rank and rank != "0" else ""
            print(f"evalctx: error{where}: {exc}", file=sys.stderr)
        abort_if_distributed(2)
        return 2
    except KeyboardInterrupt:
        from evalctx.dist import abort_if_distributed

        if _is_root_rank():
            print("evalctx: interrupted; finished samples are in the journal, rerun the same command to resume",
                  file=sys.stderr)
        abort_if_distributed(130)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
