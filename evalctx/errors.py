"""Errors that reach the user as one line (exit code 2 for bad input, 1 for a failed run), and the lazy import
guard for optional extras."""

from __future__ import annotations

import importlib.util


class UsageError(Exception):
    """Bad input: the message says what to change. The CLI prints it on one line and exits 2."""


class RunFailed(Exception):
    """The run stopped on a failure of its environment (a full or read-only disk mid-run): the manifest says
    failed, finished samples are kept, and the CLI prints the message on one line and exits 1."""


class RefusedBeforeWork(UsageError):
    """Found once the backend is up, before any sample ran (a server that samples, another server behind the URL):
    the run dir is put back as it was, not marked failed."""


class LengthError(UsageError):
    """A prompt cannot be built, or was seen, at the exact requested token length."""


def require_extra(module: str, extra: str) -> None:
    """Fail with the install line when an optional dependency is missing (before importing it)."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{module} is not installed: pip install 'evalctx[{extra}]'")
