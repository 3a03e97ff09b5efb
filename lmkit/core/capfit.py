"""Fitting an artifact under a decimal byte cap: zero the ±1 values whose loss costs least,
as few as a bracketed search over their count finds (each probe is a real encoding)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmkit.core.artifact import encode_artifact, serialize
from lmkit.core.quant import QTensor
from lmkit.errors import LmkitError


@dataclass
class Candidates:
    """All ±1 integer values, cheapest to zero first (cost ``scale^2 * col_weight``)."""

    tensor: Tensor  # index into the tensor list, per candidate
    flat: Tensor  # flat index into that tensor's q

    def __len__(self) -> int:
        return self.flat.numel()


def prune_candidates(tensors: list[QTensor]) -> Candidates:
    """Rank ±1 values by the squared output error that zeroing each adds (its own share).

    Zeroing a ±1 value moves the weight by one step ``s``: ``s^2`` in weight space, times the
    input's second moment ``H_jj`` (normalised per matrix) where calibration measured it.
    """
    idx, flat, cost = [], [], []
    for i, qt in enumerate(tensors):
        if qt.scheme != "int":
            continue
        q = qt.data
        c = qt.scale.float()[:, None].square().expand(q.shape)
        if qt.col_weight is not None:
            c = c * qt.col_weight[None, :]
        mask = (q == 1) | (q == -1)
        where = mask.flatten().nonzero().squeeze(1)
        idx.append(torch.full((where.numel(),), i, dtype=torch.int32))
        flat.append(where)
        cost.append(c.flatten()[where])
    if not flat:
        return Candidates(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.long))
    order = torch.argsort(torch.cat(cost), stable=True)
    return Candidates(torch.cat(idx)[order], torch.cat(flat)[order])


def apply_pruning(tensors: list[QTensor], cands: Candidates, k: int) -> list[QTensor]:
    """A copy of ``tensors`` with the ``k`` cheapest ±1 values set to zero."""
    out = list(tensors)
    chosen_t, chosen_f = cands.tensor[:k], cands.flat[:k]
    for i in torch.unique(chosen_t).tolist():
        q = tensors[i].data.clone()
        q.view(-1)[chosen_f[chosen_t == i]] = 0
        out[i] = replace(tensors[i], data=q)
    return out


@dataclass
class Packed:
    """The bytes that fit, the tensors they hold, and how they got there."""

    data: bytes
    tensors: list[QTensor]
    pruned: int
    candidates: int
    unpruned_bytes: int
    probes: int


def fit_to_cap(
    tensors: list[QTensor], meta: dict[str, Any], compression: str, cap_bytes: int | None, *,
    source: str | Path = "artifact", max_probes: int = 16, tolerance: float = 0.002,
    slack: float = 0.001, log: Callable[[str], None] | None = None,
) -> Packed:
    """Encode ``tensors``; if over ``cap_bytes`` (decimal, compared with the file's exact length),
    zero the cheapest ±1 values, as few as a bracketed search over the count finds.

    The count brackets between an over-cap k (lo) and an under-cap k (hi), probing by linear
    interpolation of the compressed size (bisection when it stalls), until the bracket is within
    ``tolerance`` of the candidates or the fitting encoding is within ``slack`` of the cap (each
    probe compresses the whole artifact: seconds at 16 MB). The result is always a measured
    under-cap encoding.
    """
    def encode(ts: list[QTensor], k: int) -> bytes:
        return encode_artifact(serialize(ts, {**meta, "pruned_values": k}), compression)

    data = encode(tensors, 0)
    if cap_bytes is None or len(data) <= cap_bytes:
        return Packed(data, tensors, 0, 0, len(data), 1)
    cands = prune_candidates(tensors)
    n = len(cands)
    full_tensors = apply_pruning(tensors, cands, n)
    full = encode(full_tensors, n) if n else data
    if len(full) > cap_bytes:
        raise LmkitError(
            f"{source} cannot fit --cap-bytes {cap_bytes:,} (decimal bytes): it is "
            f"{len(data):,} bytes, and still {len(full):,} with all {n:,} ±1 values pruned; "
            "raise --cap-bytes, use fewer --bits, or train a smaller model"
        )
    lo, lo_size, hi, best = 0, len(data), n, Packed(full, full_tensors, n, n, len(data), 2)
    probes, bisect = 2, False
    def close_enough() -> bool:
        return (hi - lo <= max(1, int(tolerance * n))
                or cap_bytes - len(best.data) <= slack * cap_bytes)

    while not close_enough() and probes < max_probes:
        width = hi - lo
        if bisect:
            k = (lo + hi) // 2
        else:  # aim a little past the interpolated crossing, so the probe likely fits
            frac = (lo_size - cap_bytes) / max(lo_size - len(best.data), 1)
            k = lo + math.ceil(width * min(1.0, frac * 1.02))
        k = min(max(k, lo + 1), hi - 1)
        trial = apply_pruning(tensors, cands, k)
        blob = encode(trial, k)
        probes += 1
        if len(blob) <= cap_bytes:
            hi, best = k, Packed(blob, trial, k, n, len(data), probes)
        else:
            lo, lo_size = k, len(blob)
        bisect = hi - lo > width // 2  # interpolation did not halve the bracket: bisect next
        if log:
            log(f"prune {k:,}/{n:,} ±1 values → {len(blob):,} bytes "
                f"({'fits' if len(blob) <= cap_bytes else 'over'} {cap_bytes:,})")
    best.probes = probes
    return best
