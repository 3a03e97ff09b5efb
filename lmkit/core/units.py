"""Counts as people write them: ``1000``, ``1_000_000``, ``1e6``, ``1.5M``, ``2k``, ``3G``.

One parser for every integer a user types (CLI options and ``--set`` alike); torch-free.
"""

from __future__ import annotations

import math
import re

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
    if re.fullmatch(r"[+-]?\d+", number):
        return int(number) * scale
    value = float(number) * scale
    if not math.isfinite(value) or not value.is_integer() or abs(value) >= 2**63:
        raise ValueError(f"{raw!r} is not a whole number of reasonable size")
    return int(value)
