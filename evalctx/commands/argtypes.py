"""argparse types that refuse nonsense before any work: ``--samples 0``, ``--batch-size -1``, ``--tp 0``,
``--port 70000``, ``--run-id ../x``. argparse turns the ArgumentTypeError into ``evalctx CMD: error: argument --x: ...`` (exit 2)."""

from __future__ import annotations

import argparse
import math

from evalctx.errors import UsageError


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, not {text}")
    return value


def port(text: str) -> int:
    """A TCP port, 0 (pick a free one) to 65535."""
    value = int(_number(text, int))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 0 (any free port) to 65535, not {text}")
    return value


def run_name(text: str) -> str:
    """A run id: a folder name directly under --out, never a path (see results.rundir.check_name)."""
    from evalctx.results.rundir import check_name

    try:
        return check_name(text, "run id")
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
