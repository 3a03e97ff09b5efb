"""Counts as people write them: ``1000``, ``1_000_000``, ``1e6``, ``1.5M``, ``2k``, ``3G``.

One parser for every integer a user types (CLI options and ``--set`` alike); torch-free.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_DIGITS = r"\d+(?:_\d+)*"  # underscores only between digits, as in Python
_COUNT = re.compile(rf"^([+-]?(?:{_DIGITS})?(?:\.{_DIGITS})?(?:e[+-]?\d+)?)([kmgt]?)$",
                    re.IGNORECASE)


def parse_count(text: str | int | float) -> int:
    """The whole number ``text`` spells; ``ValueError`` (with the reason) otherwise."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a number")
    if isinstance(text, int):
        return text
    if isinstance(text, float):
        if not math.isfinite(text) or not text.is_integer():
            raise ValueError(f"{text!r} is not a whole number")
        return int(text)
    raw = str(text).strip()
    match = _COUNT.match(raw)
    if not raw or match is None or not match.group(1).strip("+-"):
        raise ValueError(f"{raw!r} is not a count (e.g. 1000, 1_000_000, 1e6, 1.5M, 2k)")
    number, suffix = match.group(1).replace("_", ""), match.group(2).lower()
    scale = SUFFIXES.get(suffix, 1)
    if re.fullmatch(r"[+-]?\d{1,40}", number):
        return int(number) * scale
    if len(number) > 40:  # no count needs more digits; refuse before any arithmetic
        raise ValueError(f"{raw!r} is not a whole number of reasonable size")
    try:  # exact decimal arithmetic: 2.5e0 or 1.00000000000000001 is not silently rounded
        value = Decimal(number) * scale
    except ArithmeticError:  # InvalidOperation, Overflow
        raise ValueError(f"{raw!r} is not a count (e.g. 1000, 1_000_000, 1e6, 1.5M, 2k)") from None
    if not value.is_finite() or abs(value) >= 2**63 or value != value.to_integral_value():
        raise ValueError(f"{raw!r} is not a whole number of reasonable size")
    return int(value)
