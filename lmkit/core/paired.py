"""Paired differences of two runs' Monte-Carlo bounds scored with the same draws.

Every masked estimate draws its masks from keys (seed, stream, sequence, sample), so two runs
evaluated with the same seed on the same sequences see the same masks: common random numbers.
Their errors are then strongly correlated, and neither run's stderr says how precisely the
*difference* is known. Pairing unit by unit (sequence × independent replicate) gives it: the
difference of each sequence's replicate estimates is an unbiased estimate of that sequence's
difference, its replicates are independent, and sequences are independent of each other.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lmkit.core.contexts import protocol_of

LN2 = math.log(2.0)

# what must be equal for two estimates to have used the same draws on the same units
SAME_DRAWS = ("seed", "stream", "sequences", "seq_len", "documents", "bos_given",
              "samples_per_sequence", "replicates", "steps")


def same_draws(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two metric records were estimated from the same draws on the same tokens."""
    da, db = a.get("detail") or {}, b.get("detail") or {}
    return (a["name"] == b["name"] and a["tokens"] == b["tokens"] and a["bytes"] == b["bytes"]
            and protocol_of(a) == protocol_of(b)
            and all(k in da and da.get(k) == db.get(k) for k in SAME_DRAWS))


def paired_difference(a: dict[str, Any], units_a: torch.Tensor, b: dict[str, Any],
                      units_b: torch.Tensor) -> dict[str, Any] | None:
    """``a − b`` in bits per byte with the stderr of the paired units, or None when the two
    estimates did not share their draws (then their stderrs combine as independent)."""
    if not same_draws(a, b) or units_a.shape != units_b.shape or units_a.dim() != 2 \
            or units_a.size(1) < 2:
        return None
    d = units_a.double() - units_b.double()  # [sequences, replicates]
    reps = d.size(1)
    row_var = d.var(dim=1, unbiased=True) / reps
    scale = LN2 * a["bytes"]
    value = float(d.mean(dim=1).sum()) / scale
    stderr = math.sqrt(float(row_var.sum())) / scale
    independent = math.sqrt((a["stderr"] or 0.0) ** 2 + (b["stderr"] or 0.0) ** 2)
    return {
        "metric": a["name"], "difference": value, "stderr": stderr,
        "independent_stderr": independent,
        "z": value / stderr if stderr > 0 else None,
        "units": int(d.numel()), "tokens": a["tokens"], "bytes": a["bytes"],
        "method": "common random numbers: the same masks for both runs; stderr from the "
                  "per-sequence replicate differences, summed over sequences",
    }
