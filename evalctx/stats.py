"""Small statistics used by summaries and the regression gate (no scipy needed at import time)."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial rate; (nan, nan) when n == 0.

    ``successes`` may be fractional (string_match_all gives partial credit): the interval then treats the mean
    score as the rate, which is the usual approximation.
    """
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe_interval(s1: float, n1: int, s2: float, n2: int, z: float = Z95) -> tuple[float, float]:
    """Interval for the difference of two independent rates, ``s2/n2 - s1/n1``: Newcombe's hybrid score interval
    (his method 10, Statistics in Medicine 17:873-890, 1998), built from each rate's Wilson interval; (nan, nan)
    when either n is 0. Newcombe's example 1 (56/70 - 48/80) gives 0.0524 to 0.3339."""
    if n1 <= 0 or n2 <= 0:
        return (math.nan, math.nan)
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = wilson_interval(s1, n1, z)
    l2, u2 = wilson_interval(s2, n2, z)
    d = p2 - p1
    lower = d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    upper = d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return (max(-1.0, lower), min(1.0, upper))
