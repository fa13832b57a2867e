"""The ``evalctx`` command: run, generate, tasks, plus plan/report/compare/nightly-gate/serve/show from their own
modules.

Bad input is one line on stderr and exit 2, never a traceback. Under mpirun only world rank 0 prints.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TextIO

from evalctx.commands.argtypes import positive_int, run_name
from evalctx.errors import LengthError, RunFailed, UsageError

if TYPE_CHECKING:
    import pandas as pd
    from evalctx.run.sampling import SampleBuilder, SampleSpec

# Subcommands that live in their own module: (name, module). Each module has add_parser(sub) and main(args).
COMMAND_MODULES = [
    ("plan", "evalctx.commands.plan"),
    ("report", "evalctx.commands.report"),
    ("compare", "evalctx.commands.compare"),
    ("nightly-gate", "evalctx.commands.nightly"),
    ("serve", "evalctx.commands.serve"),
    ("show", "evalctx.commands.show"),
    ("conformance", "evalctx.commands.conformance"),
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
    p.add_argument("--backend", default=None,
                   help="fake | hf | trtllm | trtllm-llm | http (default: the suite's, else hf)")
    p.add_argument("--model", "--engine-dir", dest="model", default=None,
                   help=f"model dir, engine dir, server model name or embedded name (default: {DEFAULT_MODEL})")
    p.add_argument("--tokenizer", "--tokenizer-dir", dest="tokenizer", default=None,
                   help="tokenizer dir, embedded model name or 'byte' (default: the model dir; for the fake "
                        f"backend without a model: {DEFAULT_MODEL}'s)")
    p.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="one backend option per flag, repeatable (e.g. --backend-opt chunk_size=8192)")
    p.add_argument("--out", default="results", help="parent folder of run dirs (default: results)")
    p.add_argument("--run-id", type=run_name, default=None,
                   help="run dir name, a name and never a path (default: derived from the configuration, so the same "
                        "command resumes the same run)")
    p.add_argument("--label", default=None, help="name of this model/engine variant in reports")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--lengths", type=positive_int, nargs="+", default=None, help="override every task's lengths")
    p.add_argument("--depths", type=float, nargs="+", default=None, metavar="FRACTION",
                   help="override every task's needle depths, fractions 0..1 (0: the needle first, as "
                        "eval_long_context.py's passkey puts it)")
    p.add_argument("--min-accuracy", type=float, default=None, metavar="PERCENT",
                   help="exit 4 when the run's accuracy over its scored samples is below this many percent (as "
                        "TensorRT-LLM's eval_long_context.py asserts >= 99)")
    p.add_argument("--samples", type=positive_int, default=None, help="override samples per cell")
    p.add_argument("--prompt-mode", choices=("raw", "chat"), default=None, help="override every task's mode")
    p.add_argument("--tasks", nargs="+", metavar="NAME", default=None,
                   help="run only these tasks of the suite (names as `evalctx tasks` lists them)")
    p.add_argument("--log-samples", nargs="?", const="excerpt", choices=("excerpt", "full"), default=None,
                   help="also keep the prompts in RUN_DIR/prompts/: 'excerpt' (the default) keeps a prompt of up "
                        "to 8000 characters whole and a longer one as head, needle region and tail; 'full' keeps "
                        "every prompt whole. `evalctx show RUN SAMPLE_ID` prints one")
    p.add_argument("--no-retry-errors", action="store_true", help="on resume, keep earlier error rows")
    p.add_argument("--chat-date", default=None, metavar="YYYY-MM-DD",
                   help="the day chat templates that write the date (Llama 3.x) see as today (default: the day the "
                        "run was created, kept on every resume)")
    p.add_argument("--max-error-rate", type=float, default=0.0, metavar="RATE",
                   help="share of error rows (0..1) a complete run may have and still exit 0 (default 0: any error "
                        "row makes the run complete_with_errors, exit 3)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="write a suite's samples as JSON lines (no model needed)")
    p.add_argument("--suite", default=DEFAULT_SUITE)
    p.add_argument("--tokenizer", default=DEFAULT_MODEL, help="tokenizer dir, embedded model name or 'byte'")
    p.add_argument("--out", required=True, help="output .jsonl file ('-' for stdout)")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=None)
    p.add_argument("--samples", type=positive_int, default=None)
    p.add_argument("--prompt-mode", choices=("raw", "chat"), default=None)
    p.add_argument("--tasks", nargs="+", metavar="NAME", default=None, help="only these tasks of the suite")
    p.add_argument("--with-ids", action="store_true", help="include prompt_ids")
    p.add_argument("--chat-date", default="today", metavar="YYYY-MM-DD",
                   help="the day chat templates that write the date (Llama 3.x) see as today (default: today)")
    p.add_argument("--no-progress", action="store_true")


def _overrides(suite, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from evalctx.capacity.limits import check_suite

    if args.tasks:
        # "--tasks a b" and "--tasks a,b" alike: the comma form is what --allow-different and --family take
        args.tasks = [n.strip() for arg in args.tasks for n in arg.split(",") if n.strip()]
        have = list(dict.fromkeys(t.name for t in suite.tasks))
        unknown = [n for n in args.tasks if n not in have]
        if unknown:
            raise UsageError(f"--tasks: {', '.join(unknown)} not in suite {suite.name} (it has: {', '.join(have)})")
        suite.tasks = [t for t in suite.tasks if t.name in args.tasks]
    for t in suite.tasks:
        if args.lengths is not None:
            t.lengths = list(args.lengths)
        if getattr(args, "depths", None) is not None:
            bad = [d for d in args.depths if not 0.0 <= d <= 1.0]
            if bad:
                raise UsageError(f"--depths {bad[0]:g}: depths are fractions 0..1, not percent")
            t.depths = sorted({float(d) for d in args.depths})
        if args.samples is not None:
            t.samples = args.samples
        if args.prompt_mode:
            t.prompt_mode = args.prompt_mode
    check_suite(suite)
    return suite


def cmd_run(args: argparse.Namespace) -> int:
    from evalctx.backends.base import parse_kv_flags
    from evalctx.config import load_suite
    from evalctx.models.chat_identity import parse_date
    from evalctx.run.runner import RunConfig, Runner

    if not 0.0 <= args.max_error_rate <= 1.0:
        raise UsageError(f"--max-error-rate must be a share between 0 and 1, not {args.max_error_rate}")
    if args.min_accuracy is not None and not 1.0 < args.min_accuracy <= 100.0:
        raise UsageError(f"--min-accuracy is a percentage above 1 and at most 100 (99, not 0.99), not "
                         f"{args.min_accuracy:g}")
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
        command=shlex.join(["evalctx", *getattr(args, "argv", sys.argv[1:])]),  # the runner masks secrets
        max_error_rate=args.max_error_rate, log_samples=args.log_samples,
        chat_date=parse_date(args.chat_date) if args.chat_date else None,
    )
    runner = Runner(cfg)
    outcome = runner.run()
    if not runner.world.is_root:
        return 0
    import pandas as pd

    from evalctx.analysis.table import format_summary

    df = pd.read_parquet(outcome.run_dir / "results.parquet")
    if args.json:
        print(outcome.summary.to_json(orient="records"))
    else:
        print(format_summary(df))
        print(f"\nrun {runner.run_id}: {outcome.status}, {outcome.n_new} new of {outcome.n_total} samples "
              f"-> {outcome.run_dir}")
    errors = df.loc[df["status"] == "error", "error"]
    if len(errors):
        print(_error_note(errors, outcome.n_total, args.max_error_rate, outcome.status), file=sys.stderr)
    from evalctx.run.status import EXIT_BELOW_MIN_ACCURACY, exit_code

    code = exit_code(outcome.status)
    if args.min_accuracy is not None and code == 0:
        scored = df[df["status"] == "ok"]
        accuracy = 100 * float(scored["score"].mean()) if len(scored) else float("nan")
        if not accuracy >= args.min_accuracy:
            got = f"accuracy {accuracy:.2f}% over {len(scored)} scored samples is" if len(scored) else \
                "no sample was scored, so the accuracy cannot be"
            print(f"evalctx: {got} below --min-accuracy {args.min_accuracy:g}% (exit {EXIT_BELOW_MIN_ACCURACY})",
                  file=sys.stderr)
            return EXIT_BELOW_MIN_ACCURACY
    return code


def _error_note(errors: pd.Series, n_total: int, max_rate: float, status: str) -> str:
    """Why a run with error rows exits as it does (the accuracy printed is over the scored samples only), with the
    most frequent error message (``errors``: the error column of the error rows) so that the cause is on screen."""
    from evalctx.run.status import COMPLETE_WITH_ERRORS

    n_error = len(errors)
    counts = errors.fillna("(no message)").value_counts()
    msg, n = str(counts.index[0]), int(counts.iloc[0])
    msg = msg if len(msg) <= 300 else msg[:297] + "..."
    share = f"{n_error} of {n_total} samples are error rows ({n_error / n_total:.1%})"
    first = f"Most frequent error ({n} of {n_error}): {msg}" if counts.size > 1 else f"Error: {msg}"
    if status == COMPLETE_WITH_ERRORS:
        return (f"evalctx: {share}, above --max-error-rate {max_rate:g}: accuracy is over the scored samples only "
                f"(exit 3). {first}. All messages are in the error column of results.parquet; rerun the same "
                "command to retry them")
    return (f"evalctx: {share}; accuracy is over the scored samples only. {first}. Rerun the same command to retry "
            "them")


def _size(n_bytes: float) -> str:
    if n_bytes < 1e6:
        return f"{n_bytes / 1e3:.1f} kB"
    return f"{n_bytes / 1e6:,.0f} MB" if n_bytes >= 10e6 else f"{n_bytes / 1e6:.1f} MB"


def cmd_generate(args: argparse.Namespace) -> int:
    from evalctx.config import load_suite
    from evalctx.results.rundir import StorageError
    from evalctx.run.sampling import SampleBuilder
    from evalctx.models.tokenizer import load_tokenizer

    from evalctx.models.chat_identity import parse_date, uses_date

    if args.out != "-":
        out = Path(args.out)
        if out.is_dir():
            raise UsageError(f"--out {out} is a directory: give a file name, e.g. {out / 'samples.jsonl'}")
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: No such file or directory (the folder {out.parent} does not exist)")
        from evalctx.results.rundir import remove_dead_temporaries

        for p in remove_dead_temporaries(out):
            print(f"evalctx: removed {p}, left by a killed generate", file=sys.stderr)
    suite = _overrides(load_suite(args.suite), args)
    tokenizer = load_tokenizer(args.tokenizer)
    tokenizer.chat_date = parse_date(args.chat_date)
    if any(t.prompt_mode == "chat" for t in suite.tasks) and uses_date(tokenizer):
        print(f"evalctx: the chat template writes the date: prompts are rendered for "
              f"{tokenizer.chat_date.isoformat()} (--chat-date; the day is part of each sample id)", file=sys.stderr)
    builder = SampleBuilder(suite, tokenizer)
    builder.check_min_lengths()
    # Written under a temporary name and renamed at the end: a full disk or a Ctrl-C leaves no partial file that
    # looks like a whole suite. A bad --out (a missing folder) is one line before any work.
    output = contextlib.nullcontext(sys.stdout) if args.out == "-" else _output(Path(args.out))
    try:
        with output as out:
            _write_samples(args, builder, out)
    except StorageError as exc:
        raise UsageError(f"--out {args.out}: {exc.strerror}") from None
    return 0


def _output(path: Path) -> Any:
    """Where generate writes: a regular file (new or replaced) under a temporary name and renamed, through a
    symlink to its target; a device or a FIFO (/dev/null, /dev/stdout, a pipe) written to directly, since a rename
    would replace it with a file."""
    import stat

    from evalctx.results.rundir import atomic_file

    target = path.resolve() if path.is_symlink() else path
    if target.exists() and not stat.S_ISREG(target.stat().st_mode):
        return open(target, "w", encoding="utf-8")
    return atomic_file(target)


def _write_samples(args: argparse.Namespace, builder: SampleBuilder, out: TextIO) -> None:
    from evalctx.run.progress import Progress

    specs = builder.specs()
    n_tokens = sum(s.context_length for s in specs)

    def record(spec: SampleSpec) -> dict:
        return builder.build(spec).to_json(with_ids=args.with_ids)

    # Said before the work: a 1M-token suite takes minutes and hundreds of MB. Per suite entry (noise and essay
    # haystacks differ in bytes per token), from its shortest sample that builds: its prompt (and ids) bytes per
    # token, scaled to the entry's lengths, plus its other fields once per line.
    est, estimated = 0.0, 0
    for index in sorted({s.task_index for s in specs}):
        entry = [s for s in specs if s.task_index == index]
        for shortest in sorted(entry, key=lambda s: s.context_length)[:8]:
            try:
                rec = record(shortest)
            except LengthError:
                continue  # a sample right above its minimum that cannot be built; the loop below reports it
            per_len = len(json.dumps(rec["prompt"])) + len(json.dumps(rec.get("prompt_ids", "")))
            fixed = len(json.dumps(rec)) + 1 - per_len
            est += fixed * len(entry) + per_len / shortest.context_length * sum(s.context_length for s in entry)
            estimated += len(entry)
            break
    if estimated:
        est *= len(specs) / estimated  # an entry none of whose shortest samples builds: as the others
        print(f"evalctx: generating {len(specs)} samples, {n_tokens:,} prompt tokens, about {_size(est)} -> "
              f"{args.out}", file=sys.stderr, flush=True)
    progress = Progress(len(specs), n_tokens, enabled=not args.no_progress)
    written = skipped = 0
    try:
        for spec in specs:
            try:
                text = json.dumps(record(spec)) + "\n"
            except LengthError as exc:  # as `evalctx run` makes it an unsupported row: skip it, say so
                print(f"evalctx: skipped (unsupported): {exc}", file=sys.stderr)
                skipped += 1
                continue
            out.write(text)
            written += len(text.encode("utf-8"))
            progress.update(1, spec.context_length)
    finally:
        progress.close()
    note = f", {skipped} unsupported sample(s) skipped" if skipped else ""
    print(f"evalctx: wrote {len(specs) - skipped} samples ({_size(written)}) to {args.out}{note}", file=sys.stderr)


def _option_text(value: object) -> str:
    """An option default as it is written in a suite file (TOML); None is an option left unset."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def cmd_tasks(args: argparse.Namespace) -> int:
    from evalctx.config import list_suites
    from evalctx.tasks import get_task, list_tasks, task_defaults

    print("tasks (and their [tasks.options] with defaults):")
    for name, desc in list_tasks():
        cls = get_task(name)
        opts = ", ".join(f"{k} = {_option_text(v)}" for k, v in task_defaults(name).items()) or "none"
        print(f"  {name:<18} {desc}")
        print(f"  {'':<18} scorer {cls.scorer}, max_new_tokens {cls.default_max_new_tokens}; options: {opts}")
    print("\nsuites (tasks/*.toml here, then the package's):")
    for name, desc, path in list_suites():
        print(f"  {name:<18} {desc}  [{path}]")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), like every other evalctx error; exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = OneLineParser(prog="evalctx", description="Token-exact long-context evaluation of LLMs.")
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


def _error(message: object) -> None:
    """``evalctx: error: ...`` on one line, from world rank 0, or from any rank (naming it) once MPI is up."""
    rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK")
    if _is_root_rank() or "mpi4py.MPI" in sys.modules:
        where = f" (rank {rank})" if rank and rank != "0" else ""
        from evalctx.redact import mask_text

        print(f"evalctx: error{where}: {mask_text(str(message))}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    from evalctx.run.dist import abort_if_distributed
    from evalctx.run.interrupts import signal_name, signals_as_interrupts

    parser, handlers = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["run"]  # `evalctx` alone runs the default evaluation
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with signals_as_interrupts():
            return int(handlers[args.command](args) or 0)  # type: ignore[operator]
    except UsageError as exc:
        _error(exc)
        code = 2
    except RunFailed as exc:
        _error(exc)
        code = 1
    except KeyboardInterrupt as exc:
        if _is_root_rank():
            then = "; finished samples are in the journal, rerun the same command to resume" \
                if args.command == "run" else ""
            print(f"evalctx: interrupted ({signal_name(exc)}){then}", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # the environment refused a file or a socket: say which, without a traceback
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"{exc.strerror or exc}{where}")
        code = 2
    if code == 130 and "mpi4py.MPI" in sys.modules:
        # The launcher is already ending the job (it sent the signal to every rank, having recorded the stop in
        # the manifest): leave without MPI_Abort and its banner. A rank signalled alone still ends the job, since
        # mpirun stops the others when one exits before MPI_Finalize.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    abort_if_distributed(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
