"""The exact chain-rule code length over a strided (or left-to-right) reveal order."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lmkit.core.bpb import Metric
from lmkit.core.masking.process import CHAIN_ORDERS, MaskedSpec, masked_nats
from lmkit.core.masking.rows import EvalRows, common_detail, row_batches
from lmkit.errors import LmkitError


def chain_groups(seq: int, k: int, order: str, device: torch.device | str = "cpu"
                 ) -> tuple[Tensor, int]:
    """(group of each column, number of groups): call j reveals the columns of group j."""
    if k < 1:
        raise LmkitError("--opt chain_k must be at least 1")
    calls = math.ceil(seq / k)
    col = torch.arange(seq, device=device)
    if order == "strided":
        return col % calls, calls
    if order == "left_to_right":
        return col // k, calls
    raise LmkitError(f"--opt chain_order={order!r}: expected one of {', '.join(CHAIN_ORDERS)}")


def chain_rule_nats(model: torch.nn.Module, spec: MaskedSpec, x0: Tensor, maskable: Tensor, *,
                    k: int, order: str = "strided",
                    autocast: Callable[[], Any] | None = None,
                    segments: Tensor | None = None) -> Tensor:
    """Per-position code length (nats; 0 where not maskable) of the chain rule over each row.

    Call j masks every maskable position of groups ≥ j and scores group j: each position is
    predicted from exactly the positions revealed by earlier calls (plus the unmaskable ones,
    always visible). The time input is the one whose mask rate matches the hidden fraction,
    ``t = hidden / (L(1−ε))`` (at most 1).
    """
    group, calls = chain_groups(x0.size(1), k, order, x0.device)
    sched = spec.schedule
    n_maskable = maskable.sum(dim=1).clamp(min=1).float()
    out = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
    for j in range(calls):
        hidden = maskable & (group >= j)
        block = hidden & (group == j)
        if not block.any():
            continue
        xt = torch.where(hidden, torch.full_like(x0, spec.mask_id), x0)
        t = (hidden.sum(dim=1).float() / n_maskable / (1 - sched.eps)).clamp(sched.eps, 1.0)
        with autocast() if autocast is not None else contextlib.nullcontext():
            nats = masked_nats(model, xt, x0, block, spec.cond(t), segments)
        out = out + torch.where(block, nats, torch.zeros_like(nats))
    return out


def chain_rule(model: torch.nn.Module, ctx: Any, spec: MaskedSpec, rows: EvalRows, *, k: int,
               order: str = "strided", name: str = "chain_rule",
               on_batch: Callable[[], None] = lambda: None) -> Metric:
    """Exact code length: reveal the row in ``ceil(seq/k)`` model calls of at most k tokens,
    each coded with the model's factorised marginals given the earlier calls' tokens. A
    normalised distribution over each row, hence ``kind: exact``."""
    seq = rows.positions.size(1)
    _, calls = chain_groups(seq, k, order)
    meter = ctx.meter(name, "exact", {
        "estimator": "chain rule, factorised marginals within each call",
        "order": order, "order_rule": ("call j reveals positions j, j+s, j+2s, ... "
                                       f"(s = {calls})" if order == "strided" else
                                       "call j reveals positions jk .. jk+k-1"),
        "tokens_per_call": k, "calls_per_sequence": calls,
        "time_input": "t = hidden/(L(1-eps)), clamped to [eps, 1]",
        **common_detail(spec, rows),
    })
    for rb in row_batches(ctx.val_tokens, rows, spec, ctx.batch_size, ctx.device,
                          within=meter.shard(len(rows), ctx.batch_size)):
        nats = chain_rule_nats(model, spec, rb.x0, rb.maskable, k=k, order=order,
                               autocast=ctx.autocast, segments=rb.segments)
        meter.add(nats, rb.x0, rb.prev, rb.maskable, prev2=rb.prev2)
        on_batch()
    return meter.metric()
