"""Across-seed statistics: the incomplete beta, the Student t CDF and Welch's test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmkit.core.stats import betainc, mean_std, student_t_cdf, welch_less


@pytest.mark.parametrize("a,b,x", [(1, 1, 0.3), (2.5, 1, 0.7), (1, 3.5, 0.2), (4, 4, 0.5),
                                   (0.5, 0.5, 0.9), (30, 2, 0.95)])
def test_betainc_matches_closed_forms(a, b, x):
    if a == b and x == 0.5:
        expected = 0.5  # symmetry
    elif b == 1:
        expected = x ** a
    elif a == 1:
        expected = 1 - (1 - x) ** b
    elif a == b == 0.5:
        expected = 2 / math.pi * math.asin(math.sqrt(x))  # the arcsine distribution
    else:  # I_x(a, 2) = x^a (a + 1 − a x)... from the binomial sum for integer b
        expected = x ** a * (1 + a * (1 - x))
    assert betainc(a, b, x) == pytest.approx(expected, rel=1e-12, abs=1e-14)
    assert betainc(a, b, 0.0) == 0.0 and betainc(a, b, 1.0) == 1.0


def test_student_t_cdf_against_closed_forms_and_tables():
    for t in (-3.0, -0.4, 0.0, 1.0, 7.5):
        assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
        assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)),
                                                    abs=1e-13)
    # one-sided tail values from a t table
    assert 1 - student_t_cdf(2.0, 5) == pytest.approx(0.05097, abs=5e-6)
    assert 1 - student_t_cdf(2.015048, 5) == pytest.approx(0.05, abs=1e-6)
    assert 1 - student_t_cdf(2.228139, 10) == pytest.approx(0.025, abs=1e-6)
    assert student_t_cdf(-1.959964, 1e7) == pytest.approx(0.025, abs=1e-6)  # ~normal
    assert 1 - student_t_cdf(6.964557, 2) == pytest.approx(0.01, abs=1e-7)


def test_welch_t_and_df_match_a_hand_computation():
    a = [1.92, 1.95, 1.90, 1.97]
    b = [2.01, 2.08, 2.03]
    r = welch_less(a, b)
    xa, xb = np.array(a), np.array(b)
    va, vb = xa.var(ddof=1) / len(a), xb.var(ddof=1) / len(b)
    t = (xa.mean() - xb.mean()) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    assert r.t == pytest.approx(t, rel=1e-12) and r.df == pytest.approx(df, rel=1e-12)
    assert r.difference == pytest.approx(xa.mean() - xb.mean(), rel=1e-12)
    assert r.p == pytest.approx(student_t_cdf(t, df)) and r.p < 0.01 and r.reason is None
    # the other direction: H1 (b lower) gets the complementary p
    assert welch_less(b, a).p == pytest.approx(1 - r.p, abs=1e-12)


def test_welch_needs_two_seeds_and_some_spread():
    one = welch_less([1.0], [2.0, 2.1])
    assert one.p is None and one.t is None and "at least 2 seeds" in one.reason
    assert one.difference == pytest.approx(-1.05)
    flat = welch_less([1.0, 1.0], [2.0, 2.0])
    assert flat.p is None and "do not vary" in flat.reason


def test_mean_std_is_the_sample_std():
    assert mean_std([3.0]) == (3.0, None)
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(np.std([1, 2, 4], ddof=1))
