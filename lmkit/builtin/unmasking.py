"""Masked samplers that choose which positions to reveal: ``entropy_bounded`` and ``block``.

Both serve any objective with the ``masked`` capability, like ``confidence``, and draw every
token by Gumbel-max in float64 from ``ctx.generator`` (one uniform per position drawn and
vocabulary id, row-major) under the request's filters. Positions not revealed stay masked. The
model sees, per row, the time t at which the forward process masks as many tokens as are still
masked (through σ(t) when it is time-conditioned).

* ``entropy_bounded`` is the EB-sampler of Ben-Hamu et al. 2025 ("Accelerated Sampling from
  Masked Diffusion Models via Entropy Bounded Unmasking"), the rule of diffusers'
  ``EntropyBoundScheduler`` (used by ``DiffusionGemmaPipeline``) on the absorbing process.
* ``block`` is semi-autoregressive block-wise refinement (LLaDA's ``generate``, diffusers'
  ``BlockRefinementScheduler`` with a mask token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lmkit.builtin.samplers import (
    check_steps,
    denoise,
    draw,
    masked_spec,
    masked_time,
    reveal_counts,
    start_rows,
)
from lmkit.core.sampling import DEFAULT_DTYPE, filter_logits, sample_categorical
from lmkit.core.trunk import Transformer
from lmkit.errors import LmkitError
from lmkit.protocols import SampleContext, SampleResult

MAX_BLOCK = 1_000_000  # --opt block_size: a block longer than any context is one block anyway


def row_times(masked: Tensor, length: int, eps: float) -> Tensor:
    """Per row: the time of its number of masked tokens (:func:`masked_time`), float32."""
    return torch.tensor([masked_time(int(n), length, eps) for n in masked.sum(1).tolist()],
                        dtype=torch.float32)


# -- entropy-bounded ------------------------------------------------------------------------------
@dataclass
class EntropyBoundedOptions:
    entropy_bound: float = 0.1  # γ in nats (diffusers' default); 0: one position per step


def check_entropy_bound(ctx: SampleContext) -> float:
    bound = ctx.options.entropy_bound if ctx.options is not None else 0.1
    if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound >= 0):
        raise LmkitError(f"--opt entropy_bound={bound}: the bound γ must be a finite number of "
                         "nats >= 0 (0 reveals one position per step; diffusers' default: 0.1)")
    return float(bound)


class EntropyBoundedSampler:
    """Reveal the lowest-entropy masked positions while they are nearly independent (EB-sampler).

    Each step sorts the masked positions of each row by the entropy H of the distribution a
    token would be drawn from there (after the filters) and reveals the k lowest, k the largest
    with ``H₁ + … + H_k − max(H₁ … H_k) ≤ γ`` (``--opt entropy_bound``, nats): the sum of all
    but the largest bounds the mutual information of the revealed tokens, which the factorised
    draw ignores. The lowest is always revealed, so a row needs at most ``length`` steps; with γ = 0
    it reveals exactly one per step, lowest entropy first. ``--steps`` is the most model calls it
    may make (diffusers' ``num_inference_steps`` is a maximum too): when fewer steps remain than
    a row has masked tokens, that row reveals at least ⌈masked / steps left⌉ (lowest entropy
    first). Rows proceed independently; only unfinished rows go through the model. Which
    positions are revealed depends on the entropies alone, so tokens are drawn for those only
    (diffusers draws a candidate everywhere and discards the rest: the same distribution).
    """

    name = "entropy_bounded"
    description = ("reveal the lowest-entropy masked positions whose entropies, less the largest, "
                   "sum to at most entropy_bound (EB-sampler; diffusers EntropyBoundScheduler)")
    requires = ("masked",)
    Options = EntropyBoundedOptions

    def sample(self, model: Transformer, ctx: SampleContext) -> SampleResult:
        spec = masked_spec(ctx, self.name)
        steps, bound = check_steps(ctx), check_entropy_bound(ctx)
        x = start_rows(ctx, fill=spec.mask_id)
        calls = 0
        for step in range(steps):
            masked = x == spec.mask_id
            left = masked.sum(1)
            rows = (left > 0).nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            xa, ma = x[rows], masked[rows]
            times = row_times(ma, ctx.length, spec.schedule.eps)
            logp = filter_logits(denoise(model, xa, spec, times, ma, ctx),
                                 temperature=ctx.temperature, top_k=ctx.top_k, top_p=ctx.top_p,
                                 dtype=ctx.dtype or DEFAULT_DTYPE)
            calls += 1
            entropy = torch.special.entr(logp.exp()).sum(-1)  # nats; excluded ids (p = 0) add 0
            ent = torch.full(xa.shape, math.inf, dtype=entropy.dtype, device=x.device)
            ent[ma] = entropy
            order = ent.argsort(dim=1, stable=True)  # lowest entropy first, masked before the rest
            sorted_ent = ent.gather(1, order)
            is_cand = torch.isfinite(sorted_ent)
            below = torch.cumsum(torch.where(is_cand, sorted_ent, 0.0), dim=1) - \
                torch.where(is_cand, sorted_ent, 0.0)  # Σ of the entropies below each rank
            rank = torch.arange(xa.size(1), device=x.device).expand_as(xa)
            need = (left[rows] + (steps - step) - 1) // (steps - step)  # ⌈left / steps left⌉
            keep_sorted = is_cand & ((below <= bound) | (rank < need.unsqueeze(1)))
            keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
            xa[keep] = sample_categorical(logp[keep[ma]], ctx.generator,  # row-major, as xa[keep]
                                          greedy=ctx.temperature == 0,
                                          dtype=ctx.dtype or DEFAULT_DTYPE)
            x[rows] = xa
        return SampleResult(x, detail={"steps": calls, "max_steps": steps,
                                       "entropy_bound": bound})


# -- block-wise refinement ------------------------------------------------------------------------
@dataclass
class BlockOptions:
    block_size: int = 32    # tokens per block (diffusers' block_length, LLaDA's default too)
    threshold: float = 1.0  # also reveal candidates above this probability (diffusers 0.95); 1: off


def check_block_options(ctx: SampleContext) -> tuple[int, float]:
    size = ctx.options.block_size if ctx.options is not None else 32
    threshold = ctx.options.threshold if ctx.options is not None else 1.0
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BLOCK:
        raise LmkitError(f"--opt block_size={size}: a block holds between 1 and {MAX_BLOCK:,} "
                         "tokens (default 32)")
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise LmkitError(f"--opt threshold={threshold}: a probability in (0, 1] (1 = off; "
                         "diffusers' BlockRefinementScheduler uses 0.95)")
    return size, float(threshold)


def block_steps(length: int, size: int, steps: int) -> list[tuple[int, int, list[int]]]:
    """(start, end, tokens to reveal per step) of each block: ``steps`` shared evenly among the
    ⌈length / size⌉ blocks, each block's tokens evenly among its steps (as many steps as tokens
    at most), so a block takes ``min(its steps, its tokens)`` model calls."""
    n_blocks = -(-length // size)
    if steps < n_blocks:
        raise LmkitError(f"--steps {steps} is fewer than the {n_blocks} blocks of --length "
                         f"{length} in blocks of {size} (--opt block_size): every block needs a "
                         f"step; use --steps {n_blocks} or more, or a larger block_size")
    base, extra = divmod(steps, n_blocks)
    out = []
    for b in range(n_blocks):
        lo, hi = b * size, min((b + 1) * size, length)
        out.append((lo, hi, reveal_counts(hi - lo, base + (1 if b < extra else 0), "linear")))
    return out


class BlockSampler:
    """Semi-autoregressive refinement: left-to-right blocks, most confident first in each block.

    The generated tokens are cut into blocks of ``block_size``; ``--steps`` are shared evenly
    among the blocks and a block's tokens evenly among its steps. Inside the current block each
    step draws a candidate for every masked position and reveals the ones most probable under
    the distribution they were drawn from (plus, with ``--opt threshold=p < 1``, every candidate
    above probability p, which can finish a block early). Later blocks stay masked, and are seen
    masked by the model, until every earlier block is complete. With one block (``block_size`` ≥
    ``--length``) this is ``confidence`` with its linear schedule, token for token.
    """

    name = "block"
    description = ("block-wise refinement: left-to-right blocks of block_size tokens, most "
                   "confident first inside each (LLaDA; diffusers BlockRefinementScheduler)")
    requires = ("masked",)
    Options = BlockOptions

    def sample(self, model: Transformer, ctx: SampleContext) -> SampleResult:
        spec = masked_spec(ctx, self.name)
        size, threshold = check_block_options(ctx)
        plan = block_steps(ctx.length, size, check_steps(ctx))
        x = start_rows(ctx, fill=spec.mask_id)
        P, calls = ctx.prompt.numel(), 0
        in_block = torch.zeros_like(x, dtype=torch.bool)
        for lo, hi, counts in plan:
            in_block.zero_()
            in_block[:, P + lo:P + hi] = True
            for k in counts:
                masked = x == spec.mask_id
                cand = masked & in_block
                if not cand.any():
                    break  # every row finished this block early (threshold)
                times = row_times(masked, ctx.length, spec.schedule.eps)
                ids, logp = draw(denoise(model, x, spec, times, cand, ctx), ctx)
                calls += 1
                proposal, confidence = x.clone(), torch.full(x.shape, -math.inf,
                                                             dtype=logp.dtype, device=x.device)
                proposal[cand], confidence[cand] = ids, logp
                rank = confidence.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
                keep = cand & ((rank < k) | (confidence.exp() > threshold))
                x = torch.where(keep, proposal, x)
        return SampleResult(x, detail={"steps": calls, "block_size": size, "blocks": len(plan),
                                       "threshold": threshold})
