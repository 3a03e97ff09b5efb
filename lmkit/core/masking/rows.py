"""Validation targets laid out as the rows a masked model sees, and their exact bytes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmkit.core.contexts import DOCUMENT_ISOLATED, NON_OVERLAPPING
from lmkit.core.masking.process import MaskedSpec, free_information, masked_nats
from lmkit.errors import LmkitError


# -- evaluation rows -----------------------------------------------------------------------------
@dataclass
class EvalRows:
    """Validation targets laid out as rows the model sees.

    ``positions[r, j]`` is the index into the validation stream of row r's j-th token (-1 for
    padding). Every scored target appears exactly once. Row r is the same for every validation
    prefix that holds it whole, so per-row keyed draws make its value prefix-independent.
    """

    positions: Tensor
    unscored_tail: int

    def __len__(self) -> int:
        return self.positions.size(0)

    def padding(self) -> int:
        """Row slots that hold no target (document mode: the tail of each document's last row)."""
        return int((self.positions < 0).sum())


def eval_rows(val: Tensor, seq_len: int, spec: MaskedSpec) -> EvalRows:
    """Contiguous windows (the AR ``nll`` protocol's targets), or whole-document chunks."""
    n_targets = val.numel() - 1
    if not spec.documents:
        n_rows = n_targets // seq_len
        if n_rows == 0:
            raise LmkitError(f"the validation prefix has {n_targets} targets, fewer than one "
                             f"window of seq_len={seq_len}; raise --max-tokens")
        pos = 1 + torch.arange(n_rows * seq_len).view(n_rows, seq_len)
        return EvalRows(pos, n_targets - n_rows * seq_len)
    starts = (val[1:] == spec.bos_id).nonzero().flatten() + 1
    bounds = [1, *[int(s) for s in starts if s > 1], n_targets + 1]
    rows = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        for c in range(a, b, seq_len):
            row = torch.full((seq_len,), -1, dtype=torch.long)
            row[: min(seq_len, b - c)] = torch.arange(c, min(c + seq_len, b))
            rows.append(row)
    return EvalRows(torch.stack(rows), 0)


@dataclass
class RowBatch:
    x0: Tensor        # model input ids (PAD where invalid)
    prev: Tensor      # the stream token before each target (for byte counting)
    prev2: Tensor     # two back (-1 where none)
    valid: Tensor     # real target positions
    maskable: Tensor  # positions the forward process may mask (= scored)
    start: int = 0    # index of the batch's first row among all rows
    segments: Tensor | None = None  # document mode: 0 = the document, 1 = its PAD tail

    def nats(self, model: torch.nn.Module, xt: Tensor, masked: Tensor,
             cond: Tensor | None) -> Tensor:
        """:func:`masked_nats` of this batch's rows (the document attends only to itself)."""
        return masked_nats(model, xt, self.x0, masked, cond, self.segments)


def row_batches(val: Tensor, rows: EvalRows, spec: MaskedSpec, batch_size: int,
                device: torch.device, within: range | None = None) -> Iterator[RowBatch]:
    """Batches of ``rows`` (only those in ``within``, a rank's share, when given); each batch's
    ``start`` is its first row's index among all rows."""
    padded = torch.cat([torch.tensor([-1, -1]), val])  # index i+2 holds val[i]
    pad = spec.pad_id if spec.pad_id is not None else spec.mask_id
    within = range(len(rows)) if within is None else within
    for b in range(within.start, within.stop, batch_size):
        pos = rows.positions[b:min(b + batch_size, within.stop)]
        valid = pos >= 0
        safe = pos.clamp(min=0)
        x0 = torch.where(valid, padded[safe + 2], torch.full_like(pos, pad))
        prev, prev2 = padded[safe + 1], padded[safe]
        maskable = valid & ~((x0 == spec.bos_id) if spec.anchor_bos else torch.zeros_like(valid))
        segments = (~valid).long().to(device) if spec.documents else None
        yield RowBatch(*(t.to(device) for t in (x0, prev, prev2, valid, maskable)), start=b,
                       segments=segments)


# -- estimators --------------------------------------------------------------------------------
def row_bytes(ctx: Any, rb: RowBatch) -> Tensor:
    """Exact LUT bytes of each row's scored (maskable) targets."""
    prev = torch.where(rb.valid, rb.prev, torch.zeros_like(rb.prev))
    prev2 = torch.where(rb.valid, rb.prev2, torch.full_like(rb.prev2, -1))
    per_pos = ctx.lut.target_bytes(rb.x0.clamp(max=ctx.lut.size - 1), prev, prev2)
    return (per_pos * rb.maskable).sum(dim=1)


def common_detail(spec: MaskedSpec, rows: EvalRows) -> dict[str, Any]:
    """What every masked metric's value depends on besides the model and the estimator, led
    by its context protocol: contiguous rows of the stream, or document-isolated rows."""
    return {
        "protocol": DOCUMENT_ISOLATED if spec.documents else NON_OVERLAPPING,
        "sequences": len(rows), "seq_len": rows.positions.size(1),
        "free_information": free_information(spec), "bos_given": spec.anchor_bos,
        "documents": spec.documents, "padding_slots": rows.padding(),
        "unscored_tail_tokens": rows.unscored_tail,
    }
