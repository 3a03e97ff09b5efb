"""The context protocol of a metric: which tokens each scored target was allowed to see.

Two figures of the same model on the same tokens differ by the context they were scored with
(parameter-golf's best AR records moved from stride-64 sliding windows to document-isolated
windows), so a figure without its protocol is not comparable. Every metric states its protocol
as ``detail["protocol"]``, one of the names below; one an objective leaves out is ``unstated``
(filled in by :func:`lmkit.core.evaluate.run_evaluation`), never guessed. Torch-free: tables
and reports read it.
"""

from __future__ import annotations

import re
from typing import Any

NON_OVERLAPPING = "non_overlapping"
DOCUMENT_ISOLATED = "document_isolated"
OWN_SAMPLES = "own_samples"
UNSTATED = "unstated"

_SLIDING = re.compile(r"sliding\((\d+)\)")

PROTOCOL_NOTES = {
    NON_OVERLAPPING: "contiguous seq_len windows tiling the validation stream, across document "
                     "boundaries; a target's context is its own window only",
    "sliding": "seq_len windows advancing by the stride: after the first window every target "
               "has at least seq_len − stride tokens of context, across document boundaries",
    DOCUMENT_ISOLATED: "each document scored with only its own tokens as context: windows "
                       "restart at its BOS, a document longer than seq_len continues in "
                       "non-overlapping windows of itself",
    OWN_SAMPLES: "the model's own samples, scored by a judge: not the validation text",
    UNSTATED: "the objective did not state how its windows were formed: not comparable with "
              "any stated protocol",
}


def sliding(stride: int) -> str:
    """The name of the sliding-window protocol with this stride, e.g. ``sliding(64)``."""
    return f"sliding({int(stride)})"


def protocol_of(metric: Any) -> str:
    """The context protocol a metric (a JSON record or a :class:`~lmkit.core.bpb.Metric`)
    states, or ``unstated``."""
    detail = metric.get("detail") if isinstance(metric, dict) else getattr(metric, "detail", None)
    value = detail.get("protocol") if isinstance(detail, dict) else None
    return value if isinstance(value, str) and value else UNSTATED


def protocol_note(protocol: str) -> str:
    """One line saying what ``protocol`` means (also for names lmkit does not define)."""
    if protocol in PROTOCOL_NOTES:
        return PROTOCOL_NOTES[protocol]
    match = _SLIDING.fullmatch(protocol)
    if match:
        return PROTOCOL_NOTES["sliding"].replace("the stride", f"the stride {match.group(1)}")
    return ("named by the objective; not one of lmkit's protocols (see the objective's "
            "documentation)")


def protocol_legend(protocols: list[str], markdown: bool = False) -> list[str]:
    """One line per protocol present, in the order given."""
    seen: list[str] = []
    for p in protocols:
        if p not in seen:
            seen.append(p)
    return [f"{f'`{p}`' if markdown else p}: {protocol_note(p)}" for p in seen]
