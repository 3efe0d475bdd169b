"""Confidence intervals for proportions such as an ASR (k successes out of n images)."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95%: the 0.975 quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``successes / n`` (95% with the default ``z``).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n successes;
    ``n == 0`` gives the uninformative (0, 1)."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    if successes == 0:
        lo = 0.0  # exact at the bounds (the closed form leaves rounding noise)
    if successes == n:
        hi = 1.0
    return lo, hi


def wilson_ci95(successes: int, n: int, digits: int = 6) -> list[float]:
    """``[low, high]`` of the 95% Wilson interval, rounded like the rates in the ASR results."""
    lo, hi = wilson_interval(successes, n)
    return [round(lo, digits), round(hi, digits)]
