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
