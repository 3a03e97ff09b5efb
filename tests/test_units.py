"""Counts as people write them, parsed in one place (CLI options and --set alike)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmkit.core.units import parse_count


@pytest.mark.parametrize("text, value", [
    ("1000", 1000), ("1_000_000", 10**6), ("1e6", 10**6), ("1.5M", 1_500_000), ("2k", 2000),
    ("2K", 2000), ("3G", 3 * 10**9), (" 64 ", 64), ("0", 0), ("-5", -5), (7, 7), (8.0, 8),
])
def test_forms(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "k", "1.5", "1.2345k", "1e400", "nan", "inf", "1e-3",
                                  "12abc", "1__", True, 2.5, float("nan")])
def test_not_counts(text):
    with pytest.raises(ValueError):
        parse_count(text)


@given(st.integers(min_value=-10**15, max_value=10**15))
def test_every_integer_round_trips_in_every_spelling(n):
    assert parse_count(str(n)) == n
    assert parse_count(f"{n:_}") == n
    if n % 1000 == 0:
        assert parse_count(f"{n // 1000}k") == n


@given(st.text(max_size=12))
def test_any_text_is_a_count_or_a_clear_value_error(text):
    try:
        value = parse_count(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert isinstance(value, int)
