"""What kind of number a metric is, and how every table marks it: one table, torch-free.

``exact`` is a code length the model achieves, ``upper_bound`` a bound on one (with the standard
error of its Monte-Carlo estimate), ``score`` neither.
"""

from __future__ import annotations

import math
from typing import Any

METRIC_KINDS = ("exact", "upper_bound", "score")
KIND_MARKS = {"exact": "=", "upper_bound": "≤", "score": "score "}
KIND_NOTES = {
    "exact": "exact: a code length the model achieves (bits per byte over exactly these tokens, "
             "bytes from the tokenizer's LUT).",
    "upper_bound": "upper bound on the model's code length (a variational bound; ± one "
                   "standard error of its Monte-Carlo estimate).",
    "score": "neither a likelihood nor a bound — not comparable with the rows above "
             "(e.g. PR #1596's mean of loss_t / t).",
}


def kind_note(kind: str, markdown: bool = False) -> str:
    """The one-line legend of a kind, led by its mark (in backticks for markdown)."""
    mark = KIND_MARKS[kind].strip()
    return f"{f'`{mark}`' if markdown else mark} {KIND_NOTES[kind]}"


CODES_NOTE = ("an exact code length and an upper bound are different codes of the same "
              "tokens: a model's exact figure may lie above its bound (the chain rule factorises "
              "within each call) or below it; compare each kind across rows, not across kinds.")

FREE_MARK = "†"
FREE_NOTE = ("† given free information (BOS anchoring, document boundaries) that an AR model "
             "pays for: not comparable with AR's figures")


def has_free_information(m: dict[str, Any]) -> bool:
    return bool((m.get("detail") or {}).get("free_information"))


def format_metric(m: dict[str, Any] | None, unit: bool = False) -> str:
    """A metric as one cell: its mark, value and ± stderr where estimated (and its unit), with
    ``†`` when it was given free information."""
    if m is None:
        return ""
    value = m.get("value")
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        # no mark: a non-finite figure is neither exact, nor a bound, nor a usable score
        shown = "nan" if value is None or value != value else str(value)
        return f"{shown} (not finite)" + (f" {m['unit']}" if unit else "")
    err = f" ± {m['stderr']:.4f}" if m.get("stderr") is not None else ""
    free = FREE_MARK if has_free_information(m) else ""
    return f"{KIND_MARKS[m['kind']]}{m['value']:.4f}{err}{free}" + (
        f" {m['unit']}" if unit and m.get("unit") not in (None, "score") else "")


def legend(metrics: list[dict[str, Any]], markdown: bool = False) -> list[str]:
    """The one-line notes a table of ``metrics`` needs: each kind present, and ``†``."""
    kinds = {m["kind"] for m in metrics}
    lines = [kind_note(k, markdown) for k in KIND_NOTES if k in kinds]
    if {"exact", "upper_bound"} <= kinds:
        lines.append(CODES_NOTE)
    return lines + ([FREE_NOTE] if any(has_free_information(m) for m in metrics) else [])
