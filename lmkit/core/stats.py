"""Across-seed statistics for ``lmkit compare``: mean ± sample std and a one-sided Welch test.

Written out here rather than imported: scipy is not a dependency of lmkit, and the few closed
forms plus one continued fraction (the regularized incomplete beta function, for the Student t
CDF) are short enough to read and test against known values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_EPS = 1e-15
_TINY = 1e-300
_MAX_ITER = 500


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n − 1 in the denominator; None below 2 values)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated with the modified Lentz method."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_ITER + 1):
        m2 = 2 * m
        for coef in (m * (b - m) * x / ((qam + m2) * (a + m2)),          # even step d_2m
                     -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # odd step d_2m+1
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + coef / c
            c = c if abs(c) > _TINY else _TINY
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0) or not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1 (a={a}, b={b}, x={x})")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # the fraction converges fast below the mean (a+1)/(a+b+2); above it, use the symmetry
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    if not df > 0:
        raise ValueError(f"student_t_cdf needs df > 0 (df={df})")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


@dataclass
class WelchResult:
    """A one-sided Welch t-test of H1: mean(a) < mean(b). ``p`` is None with ``reason`` when the
    test cannot be made (fewer than 2 values on a side, or no spread on either side)."""

    difference: float           # mean(a) − mean(b)
    t: float | None
    df: float | None
    p: float | None
    reason: str | None = None


def welch_less(a: Sequence[float], b: Sequence[float]) -> WelchResult:
    """One-sided Welch t-test, H1: a's mean is lower than b's (unequal variances allowed).

    t = (ā − b̄) / sqrt(s_a²/n_a + s_b²/n_b); df by Welch–Satterthwaite; p = P(T_df <= t)."""
    mean_a, std_a = mean_std(a)
    mean_b, std_b = mean_std(b)
    difference = mean_a - mean_b
    if std_a is None or std_b is None:
        return WelchResult(difference, None, None, None,
                           f"needs at least 2 seeds on each side (have {len(a)} and {len(b)})")
    va, vb = std_a ** 2 / len(a), std_b ** 2 / len(b)
    if va + vb == 0:
        return WelchResult(difference, None, None, None,
                           "the values do not vary across seeds on either side")
    t = difference / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return WelchResult(difference, t, df, student_t_cdf(t, df))
