"""Wilson score intervals of ASR-like proportions."""

from __future__ import annotations

import math

import pytest

from clipguard.evaluation.intervals import Z95, wilson_ci95, wilson_interval


def bisect_bounds(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson interval by its definition, solved numerically: the p with |k/n - p| <= z*sqrt(p(1-p)/n)."""
    phat = k / n

    def inside(p: float) -> bool:
        return abs(phat - p) <= z * math.sqrt(p * (1 - p) / n)

    def edge(a: float, b: float) -> float:  # a inside, b outside (or the reverse)
        for _ in range(200):
            m = (a + b) / 2
            a, b = (m, b) if inside(m) == inside(a) else (a, m)
        return (a + b) / 2

    lo = 0.0 if k == 0 else edge(phat, 0.0)
    hi = 1.0 if k == n else edge(phat, 1.0)
    return lo, hi


@pytest.mark.parametrize("k,n,expect", [(0, 10, (0.0, 0.27753)), (5, 10, (0.23659, 0.76341)),
                                        (10, 10, (0.72247, 1.0)), (1, 90, (0.00196, 0.06028))])
def test_known_values(k, n, expect):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(expect[0], abs=1e-5) and hi == pytest.approx(expect[1], abs=1e-5)


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (10, 10), (3, 7), (81, 90), (171, 180), (0, 1), (1, 1)])
def test_matches_the_definition(k, n):
    lo, hi = wilson_interval(k, n)
    ref = bisect_bounds(k, n, Z95)
    assert lo == pytest.approx(ref[0], abs=1e-9) and hi == pytest.approx(ref[1], abs=1e-9)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_matches_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 10), (5, 10), (10, 10), (17, 40)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = wilson_interval(k, n)
        assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)


def test_z_and_edge_cases():
    assert wilson_interval(5, 10, z=1.96)[1] == pytest.approx(0.763410, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_ci95(5, 10) == [0.236593, 0.763407]
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
