"""Run statuses and exit codes: one table that the runner, the CLI, run_eval.sh, reports and the gate share.

A run's status is written to manifest.json; the CLI's exit code follows from it. A number evalctx prints must be
right or say why it cannot be, so any run that did not finish every sample cleanly exits non-zero.
"""

from __future__ import annotations

RUNNING = "running"
COMPLETE = "complete"
"""Every sample has a row, and no error row (or fewer than ``--max-error-rate`` allows)."""
COMPLETE_WITH_ERRORS = "complete_with_errors"
"""Every sample has a row, but the share of error rows is above ``--max-error-rate``: the accuracy is over fewer
samples than asked for. Error rows are retried on resume."""
INCOMPLETE = "incomplete"
"""Some samples have no row at all (a rank died, the run was cut short)."""
INTERRUPTED = "interrupted"
"""Stopped by SIGINT / SIGTERM; rerun the same command to resume."""
FAILED = "failed"
"""Stopped by an error (a backend crash, a full disk); rerun the same command to resume."""

STATUSES = (RUNNING, COMPLETE, COMPLETE_WITH_ERRORS, INCOMPLETE, INTERRUPTED, FAILED)

EXIT_OK = 0
EXIT_FAILED = 1
"""The run failed or is incomplete; also the regression gate's "regression"."""
EXIT_USAGE = 2
"""Bad input or bad state, found before work or at the point it was met; one line on stderr."""
EXIT_ERRORS = 3
"""The run completed with error rows above ``--max-error-rate`` (status ``complete_with_errors``)."""
EXIT_BELOW_MIN_ACCURACY = 4
"""The run completed, but its accuracy over the scored samples is below ``--min-accuracy`` (TensorRT-LLM's
eval_long_context.py asserts accuracy >= 99 and fails)."""
EXIT_INTERRUPTED = 130
"""SIGINT or SIGTERM: finished samples are kept; the same command resumes."""


def exit_code(status: str) -> int:
    """The CLI exit code for a finished run's status."""
    return {COMPLETE: EXIT_OK, COMPLETE_WITH_ERRORS: EXIT_ERRORS, INTERRUPTED: EXIT_INTERRUPTED}.get(status,
                                                                                                  EXIT_FAILED)
