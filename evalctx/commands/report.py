"""``evalctx report RUN_DIR [RUN_DIR ...]``: report.html (self-contained) and report.md with plots."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="write report.html and report.md for one or several runs",
        description="Write report.html (self-contained, readable offline) and report.md with plots/*.png, "
                    "results first: effective length and accuracy per length, depth x length heatmaps (and "
                    "difference heatmaps for two runs or against --baseline), accuracy and latency vs length with "
                    "Wilson 95% intervals, wrong answers, errors; then the settings each run used, the runs and "
                    "their options. Several runs side by side.")
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run directories (results/<run_id>)")
    p.add_argument("--baseline", metavar="DIR", default=None,
                   help="a run directory to compare every run with (adds the gate's table and a difference "
                        "heatmap per task)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default: the first RUN_DIR)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from evalctx.report.render import write_report

    html_path, md_path = write_report(args.run_dirs, args.out, baseline=args.baseline)
    print(f"wrote {html_path} and {md_path}")
    return 0
