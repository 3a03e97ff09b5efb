"""``evaluate_masked``: every masked metric of an objective with a MaskedSpec, per --opt."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lmkit.core import distributed
from lmkit.core.bpb import Metric
from lmkit.core.masking.chain import chain_groups, chain_rule
from lmkit.core.masking.nelbo import check_design, monte_carlo_nelbo
from lmkit.core.masking.process import ESTIMATORS, MaskedSpec
from lmkit.core.masking.rows import eval_rows
from lmkit.errors import LmkitError


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    except ValueError:
        raise LmkitError(f"--opt steps={text!r}: expected comma-separated integers, "
                         f"e.g. steps=128,512") from None
    if any(s < 1 for s in steps):
        raise LmkitError("--opt steps: every T must be at least 1")
    return steps


@dataclass
class MaskedEvalOptions:
    """``lmkit eval --opt key=value`` options of masked-denoiser objectives."""

    samples: int = 4             # K draws per sequence for the Monte-Carlo NELBOs (model calls)
    replicates: int = 2          # independent replicates among the K (stderr); K/replicates strata
    estimator: str = "any_order"  # "any_order" (bounded weights) or "time" (the 1/t form)
    steps: str = "128,512"       # T of the discrete-time bounds ("" = none)
    chain_k: int = 32            # tokens revealed per model call in chain_rule (0 = off)
    chain_order: str = "strided"  # "strided" (call j: positions j, j+s, ...) or "left_to_right"


def evaluate_masked(model: torch.nn.Module, ctx: Any, spec: MaskedSpec,
                    steps: list[int] | None = None) -> list[Metric]:
    """The likelihood metrics every masked denoiser gets, over one set of rows (same tokens).
    ``steps``: the T of the discrete bounds, instead of ``--opt steps``."""
    opts: MaskedEvalOptions = ctx.options
    rows = eval_rows(ctx.val_tokens, ctx.seq_len, spec)
    if ctx.purpose == "validation":
        return [monte_carlo_nelbo(model, ctx, spec, rows, samples=2, steps=None,
                                  seed=ctx.seed, name="nelbo_mc")]
    if opts.estimator not in ESTIMATORS:
        raise LmkitError(f"--opt estimator={opts.estimator!r}: expected one of "
                         f"{', '.join(ESTIMATORS)}")
    check_design(opts.samples, opts.replicates)
    if opts.chain_k:
        chain_groups(ctx.seq_len, opts.chain_k, opts.chain_order)  # fail before any work
    steps = parse_steps(opts.steps) if steps is None else steps
    n_batches = math.ceil(len(distributed.shard(len(rows), ctx.batch_size)) / ctx.batch_size)
    total = n_batches * (1 + len(steps) + (1 if opts.chain_k else 0))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        ctx.progress(done, total)

    mc = {"samples": opts.samples, "seed": ctx.seed, "estimator": opts.estimator,
          "replicates": opts.replicates, "on_batch": tick}
    metrics = [monte_carlo_nelbo(model, ctx, spec, rows, steps=None, name="nelbo_mc", **mc)]
    for T in steps:
        metrics.append(monte_carlo_nelbo(model, ctx, spec, rows, steps=T, name=f"nelbo_T{T}",
                                         **mc))
    if opts.chain_k:
        metrics.append(chain_rule(model, ctx, spec, rows, k=opts.chain_k,
                                  order=opts.chain_order, on_batch=tick))
    return metrics
