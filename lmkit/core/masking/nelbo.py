"""The Monte-Carlo NELBO (continuous and T-step) with an unbiased stderr from independent
replicates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmkit.core import distributed
from lmkit.core.bpb import Metric
from lmkit.core.masking.draws import RNG_DESCRIPTION, AnyOrderTable, keyed_uniforms, nelbo_draw
from lmkit.core.masking.process import ESTIMATORS, MaskedSpec
from lmkit.core.masking.rows import EvalRows, RowBatch, common_detail, row_batches, row_bytes
from lmkit.errors import LmkitError


@dataclass
class RowEstimates:
    """Per-row NELBO estimates (nats, prior included), their variances, bytes and tokens, and
    the per-replicate row estimates ``[rows, R]`` that paired comparisons need (CPU)."""

    nats: Tensor
    var: Tensor
    bytes: Tensor
    tokens: Tensor
    replicates: Tensor


def check_design(samples: int, replicates: int) -> int:
    """The number of strata of K = ``samples`` draws split into ``replicates`` replicates."""
    if replicates < 2:
        raise LmkitError("--opt replicates must be at least 2: a standard error needs "
                         "independent replicates")
    if samples < replicates or samples % replicates:
        raise LmkitError(f"--opt samples={samples} must be a multiple of --opt "
                         f"replicates={replicates} (K draws = replicates × strata)")
    return samples // replicates


def replicate_mean_var(values: Tensor, replicates: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: the mean of ``values`` ``[B, R·S]`` (replicate r = columns r·S .. r·S+S-1), the
    variance of that mean from the R replicate means, and those means ``[B, R]``. Explicit
    element-wise sums, so each row's result is bit-identical whatever the rows beside it."""
    strata = values.size(1) // replicates
    reps = []
    for r in range(replicates):
        acc = values[:, r * strata]
        for s in range(1, strata):
            acc = acc + values[:, r * strata + s]
        reps.append(acc / strata)
    mean = reps[0]
    for rep in reps[1:]:
        mean = mean + rep
    mean = mean / replicates
    ss = (reps[0] - mean) ** 2
    for rep in reps[1:]:
        ss = ss + (rep - mean) ** 2
    return mean, ss / (replicates - 1) / replicates, torch.stack(reps, dim=1)


def draw_plan(strata: int, paired: bool) -> list[tuple[int, int | None]]:
    """The draws of one replicate: (low stratum, its mirror) antithetic pairs, or singles.

    Stratum s covers v ∈ [s/S, (s+1)/S); its mirror S−1−s gets 1 − v. Paired only where
    ``paired`` (the any-order form, whose mask size is monotone in v); an odd middle stratum,
    or every stratum when unpaired, is a single draw with its own uniform.
    """
    if not paired:
        return [(s, None) for s in range(strata)]
    plan: list[tuple[int, int | None]] = [(s, strata - 1 - s) for s in range(strata // 2)]
    if strata % 2:
        plan.append((strata // 2, None))
    return plan


def nelbo_rows(model: torch.nn.Module, ctx: Any, spec: MaskedSpec, rows: EvalRows, *,
               samples: int, steps: int | None, seed: int, stream: str,
               estimator: str = "any_order", replicates: int = 2,
               on_batch: Callable[[], None] = lambda: None) -> RowEstimates:
    """Per-row Monte-Carlo NELBO (continuous, or T=``steps``) with an unbiased variance.

    One model call per (batch, sample): the cost of K = ``samples`` draws per row is what it was
    for the 1/t estimator; the draws are keyed per (seed, stream, row, sample). Under torchrun
    each rank estimates its share of the rows and the per-row results are summed over ranks,
    so every rank returns all rows, as one process would.
    """
    if estimator not in ESTIMATORS:
        raise LmkitError(f"--opt estimator={estimator!r}: expected one of {', '.join(ESTIMATORS)}")
    strata = check_design(samples, replicates)
    sched = spec.schedule
    prior = sched.prior_nats_per_token(spec.vocab_size)
    seq = rows.positions.size(1)
    out = RowEstimates(*(torch.zeros(len(rows), dtype=d) for d in
                         (torch.float64, torch.float64, torch.long, torch.long)),
                       replicates=torch.zeros(len(rows), replicates, dtype=torch.float64))
    tables: dict[int, AnyOrderTable] = {}
    plan = draw_plan(strata, paired=estimator == "any_order")
    for rb in row_batches(ctx.val_tokens, rows, spec, ctx.batch_size, ctx.device,
                          within=distributed.shard(len(rows), ctx.batch_size)):
        n = rb.x0.size(0)
        ids = range(rb.start, rb.start + n)
        u = keyed_uniforms(seed, stream, ids, samples, 2 * seq + 3, ctx.device)
        values = torch.empty(n, samples, dtype=torch.float64, device=ctx.device)

        def draw(k: int, v: Tensor, within: Tensor | None = None, rb: RowBatch = rb,
                 u: Tensor = u) -> tuple[Tensor, Tensor, Tensor]:
            masked, t, weight = nelbo_draw(u[:, k, 1:], v, rb.maskable, sched,
                                           estimator=estimator, steps=steps, tables=tables,
                                           within=within)
            xt = torch.where(masked, torch.full_like(rb.x0, spec.mask_id), rb.x0)
            with ctx.autocast():
                nats = rb.nats(model, xt, masked, spec.cond(t.float())).double()
            return masked, nats, weight

        for r in range(replicates):
            base = r * strata
            for low, high in plan:
                v = (low + u[:, base + low, 0]) / strata
                if high is None:
                    _, nats, weight = draw(base + low, v)
                    values[:, base + low] = nats.sum(dim=1) * weight
                    continue
                # antithetic pair: the high draw (1 − v) first, then the low one (v) masks a
                # uniform subset of the high one's mask set; its control variate, the high
                # draw's cross-entropy on that subset minus on the whole set, has mean zero
                masked_b, nats_b, weight_b = draw(base + high, 1.0 - v)
                value_b = nats_b.sum(dim=1) * weight_b
                masked_a, nats_a, weight_a = draw(base + low, v, within=masked_b)
                control = torch.where(masked_a, nats_b, torch.zeros_like(nats_b)).sum(dim=1)
                values[:, base + high] = value_b
                values[:, base + low] = (nats_a.sum(dim=1) - control) * weight_a + value_b
        mean, var, reps = replicate_mean_var(values, replicates)
        tokens = rb.maskable.sum(dim=1)
        out.nats[ids.start:ids.stop] = (mean + prior * tokens.double()).cpu()
        out.replicates[ids.start:ids.stop] = (reps + prior * tokens.double()[:, None]).cpu()
        out.var[ids.start:ids.stop] = var.cpu()
        out.bytes[ids.start:ids.stop] = row_bytes(ctx, rb).cpu()
        out.tokens[ids.start:ids.stop] = tokens.cpu()
        on_batch()
    distributed.all_sum(out.nats, out.var, out.bytes, out.tokens, out.replicates)
    return out


def monte_carlo_nelbo(model: torch.nn.Module, ctx: Any, spec: MaskedSpec, rows: EvalRows, *,
                      samples: int, steps: int | None, seed: int, name: str,
                      estimator: str = "any_order", replicates: int = 2,
                      on_batch: Callable[[], None] = lambda: None) -> Metric:
    """NELBO in bits per byte with an honest standard error (see the module docstring).

    ``steps=None``: the continuous-time NELBO (t over all of [0, 1]); ``steps=T``: the T-step
    discrete bound. The sums over rows run in row order once at the end, so the value is
    identical for any batch size.
    """
    if samples < 2:
        raise LmkitError("the Monte-Carlo NELBO needs --opt samples>=2 for a standard error")
    if estimator not in ESTIMATORS:
        raise LmkitError(f"--opt estimator={estimator!r}: expected one of {', '.join(ESTIMATORS)}")
    check_design(samples, replicates)
    sched = spec.schedule
    stream = f"{name}/{estimator}"
    meter = ctx.meter(name, "upper_bound", {
        "estimator": (f"{'continuous-time NELBO' if steps is None else f'{steps}-step NELBO'}, "
                      + ("any-order form: n ~ P_n, time from its posterior given n"
                         if estimator == "any_order" else
                         "time form: t ~ U(0,1], non-empty mask sets, weight P(n>=1)/t")),
        "form": estimator,
        "weight": ("L(1-eps) per mean masked cross-entropy" if estimator == "any_order"
                   else "P(n>=1)/t per masked cross-entropy sum"),
        "design": (f"{replicates} independent replicates x {samples // replicates} strata in v"
                   + (" (antithetic pairs v, 1-v; the small mask set a uniform subset of the "
                      "large one, with a mean-zero control variate)"
                      if estimator == "any_order" and samples // replicates > 1 else "")),
        "schedule": f"log-linear, eps={sched.eps}", "steps": steps,
        "samples_per_sequence": samples, "replicates": replicates,
        "strata": samples // replicates,
        "stderr_method": "unbiased: variance between independent replicates per sequence, "
                         "summed over sequences",
        "seed": seed, "rng": RNG_DESCRIPTION, "stream": stream,
        "time_input": spec.time_input,
        "prior_nats_per_token": sched.prior_nats_per_token(spec.vocab_size),
        **common_detail(spec, rows),
    })
    est = nelbo_rows(model, ctx, spec, rows, samples=samples, steps=steps, seed=seed,
                     stream=stream, estimator=estimator, replicates=replicates,
                     on_batch=on_batch)
    meter.add_estimate(est.nats, est.var, est.bytes, est.tokens)
    metric = meter.metric()
    metric.units = est.replicates  # for the paired stderr of a difference (lmkit compare)
    return metric
