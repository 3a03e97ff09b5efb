"""Masked cross-entropy at fixed times, and scores that are weighted sums of its per-time means.

Some published figures of masked models are ``Σ_i w_i · c̄(t_i)``, with ``c̄(t)`` the mean
cross-entropy of the masked positions when each is masked at rate ``r(t)`` (PR #1596's mean of
``loss_t / t``; a quadrature of ``c̄`` over part of [0, 1]). This module measures ``c̄`` at the
given times with keyed draws and turns such a sum into a ``kind: score`` through the byte meter,
with the delta method's standard error. Which times, rates and weights make which figure is the
objective's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmkit.core import distributed
from lmkit.core.bpb import Metric
from lmkit.core.masking.draws import keyed_uniforms
from lmkit.core.masking.process import MaskedSpec
from lmkit.core.masking.rows import EvalRows, row_batches, row_bytes
from lmkit.errors import LmkitError

STDERR_METHOD = "delta method of the ratio of sums, rows as independent units"


@dataclass
class FixedTimeCE:
    """Per (time, row): masked cross-entropy sums and masked counts; per row: scored tokens
    and their LUT bytes (CPU, float64 / int64)."""

    ce: Tensor
    count: Tensor
    tokens: Tensor
    bytes: Tensor

    def means(self) -> Tensor:
        """``c̄(t_i)``: the mean masked cross-entropy at each time, a ratio of sums over rows."""
        return self.ce.sum(dim=1) / self.count.sum(dim=1).clamp(min=1)


def fixed_time_ce(model: torch.nn.Module, ctx: Any, spec: MaskedSpec, rows: EvalRows, *,
                  times: Sequence[float], rates: Sequence[float], stream: str,
                  seed: int) -> FixedTimeCE:
    """Mask each maskable position of each row with probability ``rates[i]`` and score the
    masked ones with the model given ``spec.cond(times[i])``. Row r's masks at the i-th time
    come from the generator keyed (seed, stream, r, i): independent of batch size and prefix."""
    if len(times) != len(rates) or not times:
        raise ValueError("fixed_time_ce needs one mask rate per time")
    if len(rows) < 2:
        raise LmkitError("a fixed-time score needs at least 2 sequences; raise --max-tokens")
    seq = rows.positions.size(1)
    k = len(times)
    out = FixedTimeCE(torch.zeros(k, len(rows), dtype=torch.float64),
                      torch.zeros(k, len(rows), dtype=torch.float64),
                      torch.zeros(len(rows), dtype=torch.long),
                      torch.zeros(len(rows), dtype=torch.long))
    for rb in row_batches(ctx.val_tokens, rows, spec, ctx.batch_size, ctx.device,
                          within=distributed.shard(len(rows), ctx.batch_size)):
        n = rb.x0.size(0)
        r = slice(rb.start, rb.start + n)
        u = keyed_uniforms(seed, stream, range(r.start, r.stop), k, seq, ctx.device)
        for i, (t, rate) in enumerate(zip(times, rates, strict=True)):
            masked = (u[:, i] < rate) & rb.maskable
            xt = torch.where(masked, torch.full_like(rb.x0, spec.mask_id), rb.x0)
            cond = spec.cond(torch.full((n,), float(t), device=ctx.device))
            with ctx.autocast():
                nats = rb.nats(model, xt, masked, cond)
            out.ce[i, r] = nats.double().sum(dim=1).cpu()
            out.count[i, r] = masked.sum(dim=1).double().cpu()
        out.tokens[r] = rb.maskable.sum(dim=1).cpu()
        out.bytes[r] = row_bytes(ctx, rb).cpu()
    distributed.all_sum(out.ce, out.count, out.tokens, out.bytes)  # under torchrun: all rows
    return out


def weighted_mean_score(meter: Any, fc: FixedTimeCE, weights: Sequence[float]) -> Metric:
    """``Σ_i w_i · c̄(t_i)`` nats per token, over the rows' tokens and LUT bytes, as a score.

    The sum is a function of ratios of sums over rows; its standard error is the delta method's,
    rows as the independent units (it includes the spread between rows, so it is conservative
    for the Monte-Carlo error alone)."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    if w.numel() != fc.ce.size(0):
        raise ValueError("one weight per time")
    totals = fc.count.sum(dim=1).clamp(min=1)
    ratio = fc.ce.sum(dim=1) / totals
    score = (w * ratio).sum()                                   # nats per token
    # linearised per-row contributions: they sum to 0, their spread is the score's
    z = (w[:, None] * (fc.ce - ratio[:, None] * fc.count) / totals[:, None]).sum(dim=0)
    m = fc.ce.size(1)
    var_per_token = z.pow(2).sum() * m / (m - 1)
    n_tokens = fc.tokens.sum().double()
    meter.add_estimate((score * n_tokens).view(1), (var_per_token * n_tokens**2).view(1),
                       fc.bytes.sum().view(1), fc.tokens.sum().view(1))
    return meter.metric()
