"""Needle depth grids: explicit fractions, evenly spaced, or gkamradt's sigmoid spacing (dense at both ends)."""

from __future__ import annotations

import math
from typing import Any

from evalctx.errors import UsageError
from evalctx.capacity.limits import check_depth_count


def _linspace(n: int) -> list[float]:
    return [0.0] if n == 1 else [i / (n - 1) for i in range(n)]


def _count(key: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"depths {{{key} = {n!r}}}: the number of depths must be a positive integer")
    return check_depth_count(n, f"depths {{{key} = {n}}}")


def sigmoid_depths(n: int) -> list[float]:
    """``LLMTest_NeedleInAHaystack``: ``logistic(x, L=100, x0=50, k=.1)`` over ``linspace(0, 100, n)``, rounded to
    3 decimals, with the two ends pinned to 0 and 100 -- returned as fractions."""

    def logistic(x: float, big_l: float = 100, x0: float = 50, k: float = 0.1) -> float:
        if x in (0, 100):
            return x
        return round(big_l / (1 + math.exp(-k * (x - x0))), 3)

    pct = [logistic(100 * f) for f in _linspace(n)]
    return [round(p / 100, 5) for p in pct]


def depth_grid(spec: Any) -> list[float]:
    """Depths as fractions 0..1 from a suite spec.

    ``spec`` is a list of fractions (``[0, 0.25, 1]``), ``{"linear": n}`` (n points from 0 to 1 inclusive) or
    ``{"sigmoid": n}`` (gkamradt's logistic spacing). Anything else raises UsageError.
    """
    if isinstance(spec, dict):
        if len(spec) != 1:
            raise UsageError(f"depths: give one of {{linear = n}} or {{sigmoid = n}}, got {spec!r}")
        (key, n), = spec.items()
        if key == "linear":
            return _linspace(_count(key, n))
        if key == "sigmoid":
            return sigmoid_depths(_count(key, n))
        raise UsageError(f"depths: unknown spacing {key!r}: choose linear or sigmoid")
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise UsageError("depths: the list is empty")
        out = []
        for v in spec:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise UsageError(f"depths: {v!r} is not a number")
            if v > 1:
                raise UsageError(f"depths: {v!r} is above 1: depths are fractions 0..1, not percent")
            if v < 0:
                raise UsageError(f"depths: {v!r} is below 0: depths are fractions 0..1")
            out.append(float(v))
        return out
    raise UsageError(f"depths: expected a list of fractions or {{linear = n}} / {{sigmoid = n}}, got {spec!r}")
