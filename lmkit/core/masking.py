"""The absorbing-mask process and the likelihood estimators every masked denoiser shares.

Forward process: each token is replaced by MASK independently with probability ``1 - α(t)``,
``α(t) = 1 - (1-ε)t`` (log-linear). The continuous-time NELBO per sequence is

    ∫₀¹ w(t) · E[ Σ_masked −log p(x₀ | x_t) ] dt   with   w(t) = −α'(t) / (1 − α(t)) = 1/t,

plus the prior term ``α(1)·ln V`` per token: at t = 1 a fraction ε of tokens is still visible, so
the prior over x₁ must give them mass (we use (1−ε)·MASK + ε·Uniform(V), whose KL from q is
exactly ``ε ln V`` per token). The T-step discrete bound replaces the integral by
``Σ_{i=1..T} (1/i) E[Σ_masked −log p(x₀ | x_{i/T})]``; it is never below the continuous one and
tightens as T grows. A left-to-right chain rule that reveals k tokens per model call is a
normalised distribution, so it is an exact code length.

Everything here takes a :class:`MaskedSpec` so built-in and third-party masked objectives share it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmkit.core.bpb import Metric
from lmkit.errors import LmkitError


@dataclass(frozen=True)
class LogLinearSchedule:
    """``α(t) = 1 − (1−ε)t``: the MDLM schedule; its ELBO weight is exactly ``1/t``."""

    eps: float = 1e-3

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - (1 - self.eps) * t

    def mask_prob(self, t: Tensor) -> Tensor:
        return (1 - self.eps) * t

    def sigma(self, t: Tensor) -> Tensor:
        """Total noise ``−log α(t)``: what MDLM-style models are conditioned on."""
        return -torch.log(self.alpha(t))

    def weight(self, t: Tensor) -> Tensor:
        """``−α'(t) / (1 − α(t))``, computed from the schedule (equals 1/t)."""
        return (1 - self.eps) / self.mask_prob(t)

    def prior_nats_per_token(self, vocab_size: int) -> float:
        """KL(q(x₁|x₀) ‖ (1−α₁)·MASK + α₁·Uniform(V)) per token = α(1)·ln V."""
        return self.eps * math.log(vocab_size)


@dataclass(frozen=True)
class MaskedSpec:
    """What an objective tells the shared machinery about its tokens and its model's input."""

    mask_id: int
    vocab_size: int
    bos_id: int
    pad_id: int | None = None
    schedule: LogLinearSchedule = LogLinearSchedule()
    time_input: str | None = "sigma"  # what the model is conditioned on: "sigma", "t" or None
    anchor_bos: bool = False           # BOS is never masked (a given document anchor)
    documents: bool = False            # rows never cross a document start (PAD fills the rest)

    def cond(self, t: Tensor) -> Tensor | None:
        if self.time_input is None:
            return None
        return self.schedule.sigma(t) if self.time_input == "sigma" else t


def stratified_times(n: int, t_min: float, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Tensor:
    """n times covering [t_min, 1] in equal strata with one shared uniform offset.

    Antithetic/stratified sampling: the batch always spans the whole schedule, which removes most
    of the variance a batch of i.i.d. times would add to the loss.
    """
    u = torch.rand((), generator=generator, device=device)
    k = torch.arange(n, device=device, dtype=torch.float32)
    return t_min + (1 - t_min) * (k + u) / n


def mask_tokens(x0: Tensor, mask_prob: Tensor, maskable: Tensor, mask_id: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Absorbing forward process: returns (x_t, masked); ``mask_prob`` is one value per row."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = (u < mask_prob.unsqueeze(-1)) & maskable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def document_layout(x0: Tensor, spec: MaskedSpec) -> Tensor:
    """Valid positions of training windows in document mode: a row stops where the next
    document starts (its BOS and everything after become PAD)."""
    if not spec.documents:
        return torch.ones_like(x0, dtype=torch.bool)
    is_bos = x0 == spec.bos_id
    is_bos[:, 0] = False  # a row may start with its own document's BOS
    return torch.cumsum(is_bos.int(), dim=1) == 0


def masked_spec(tokens: Any, eps: float, time_input: str | None, anchor_bos: bool,
                documents: bool) -> MaskedSpec:
    """The spec of an objective whose special tokens include ``MASK`` and ``PAD``."""
    if not 0 < eps < 1:
        raise LmkitError(f"options.eps must be in (0, 1), got {eps}")
    return MaskedSpec(
        mask_id=tokens["MASK"], vocab_size=tokens.vocab_size, bos_id=tokens.bos_id,
        pad_id=tokens["PAD"], schedule=LogLinearSchedule(eps), time_input=time_input,
        anchor_bos=anchor_bos, documents=documents,
    )


def training_rows(batch: Any, spec: MaskedSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 with PAD where invalid, maskable positions) from a batch of stream windows."""
    x0 = batch.tokens[:, 1:]
    valid = document_layout(x0, spec)
    x0 = torch.where(valid, x0, torch.full_like(x0, spec.pad_id))
    maskable = valid & ~(x0 == spec.bos_id) if spec.anchor_bos else valid
    return x0, maskable


def masked_nats(model: torch.nn.Module, xt: Tensor, x0: Tensor, masked: Tensor,
                cond: Tensor | None) -> Tensor:
    """−log p(x₀ | x_t) at masked positions (0 elsewhere), float32, shape of x0.

    Only masked positions go through the output head: at t≈0.5 that halves its cost.
    """
    hidden = model.forward_hidden(xt, cond)
    out = torch.zeros(x0.shape, device=x0.device, dtype=torch.float32)
    if masked.any():
        logits = model.logits(hidden[masked])
        out[masked] = F.cross_entropy(logits.float(), x0[masked], reduction="none")
    return out


# -- evaluation rows -----------------------------------------------------------------------------
@dataclass
class EvalRows:
    """Validation targets laid out as rows the model sees.

    ``positions[r, j]`` is the index into the validation stream of row r's j-th token (-1 for
    padding). Every scored target appears exactly once.
    """

    positions: Tensor
    unscored_tail: int

    def __len__(self) -> int:
        return self.positions.size(0)


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


def row_batches(val: Tensor, rows: EvalRows, spec: MaskedSpec, batch_size: int,
                device: torch.device) -> Iterator[RowBatch]:
    padded = torch.cat([torch.tensor([-1, -1]), val])  # index i+2 holds val[i]
    pad = spec.pad_id if spec.pad_id is not None else spec.mask_id
    for b in range(0, len(rows), batch_size):
        pos = rows.positions[b:b + batch_size]
        valid = pos >= 0
        safe = pos.clamp(min=0)
        x0 = torch.where(valid, padded[safe + 2], torch.full_like(pos, pad))
        prev, prev2 = padded[safe + 1], padded[safe]
        maskable = valid & ~((x0 == spec.bos_id) if spec.anchor_bos else torch.zeros_like(valid))
        yield RowBatch(*(t.to(device) for t in (x0, prev, prev2, valid, maskable)))


# -- estimators --------------------------------------------------------------------------------
def row_bytes(ctx: Any, rb: RowBatch) -> Tensor:
    """Exact LUT bytes of each row's scored (maskable) targets."""
    prev = torch.where(rb.valid, rb.prev, torch.zeros_like(rb.prev))
    prev2 = torch.where(rb.valid, rb.prev2, torch.full_like(rb.prev2, -1))
    per_pos = ctx.lut.target_bytes(rb.x0.clamp(max=ctx.lut.size - 1), prev, prev2)
    return (per_pos * rb.maskable).sum(dim=1)


def monte_carlo_nelbo(model: torch.nn.Module, ctx: Any, spec: MaskedSpec, rows: EvalRows, *,
                      samples: int, steps: int | None, seed: int, name: str,
                      on_batch: Callable[[], None] = lambda: None) -> Metric:
    """NELBO in bits per byte with a standard error: ``K=samples`` stratified times per row.

    ``steps=None``: continuous time, t ∈ [ε, 1] (the 1/(1−ε) normalisation of a uniform draw on
    [ε, 1] stands in for the [0, ε) sliver; this over- rather than under-states the bound when the
    masked cross-entropy grows with t). ``steps=T``: the T-step discrete bound, t on {1/T..1}.
    """
    if samples < 2:
        raise LmkitError("the Monte-Carlo NELBO needs --opt samples>=2 for a standard error")
    sched = spec.schedule
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    prior = sched.prior_nats_per_token(spec.vocab_size)
    meter = ctx.meter(name, "upper_bound", {
        "estimator": ("continuous-time NELBO, Monte Carlo" if steps is None
                      else f"discrete-time NELBO, T={steps}, Monte Carlo over steps"),
        "weight": "-alpha'(t)/(1-alpha(t)) = 1/t" if steps is None else "1/i",
        "schedule": f"log-linear, eps={sched.eps}",
        "samples_per_sequence": samples, "steps": steps, "sequences": len(rows),
        "seq_len": rows.positions.size(1), "seed": seed,
        "prior_nats_per_token": prior, "bos_given": spec.anchor_bos,
        "documents": spec.documents, "unscored_tail_tokens": rows.unscored_tail,
    })
    for rb in row_batches(ctx.val_tokens, rows, spec, ctx.batch_size, ctx.device):
        n = rb.x0.size(0)
        per_row = torch.empty(n, samples, device=ctx.device, dtype=torch.float64)
        u = torch.rand(n, 1, generator=gen, device=ctx.device)
        strata = (torch.arange(samples, device=ctx.device) + u) / samples  # [n, K] in (0, 1)
        if steps is None:
            times = sched.eps + (1 - sched.eps) * strata
        else:
            times = (torch.floor(strata * steps) + 1).clamp(max=steps) / steps
        for k in range(samples):
            t = times[:, k]
            xt, masked = mask_tokens(rb.x0, sched.mask_prob(t), rb.maskable, spec.mask_id, gen)
            with ctx.autocast():
                nats = masked_nats(model, xt, rb.x0, masked, spec.cond(t))
            per_row[:, k] = nats.double().sum(dim=1) * sched.weight(t).double()
        tokens = rb.maskable.sum(dim=1)
        estimate = per_row.mean(dim=1) + prior * tokens.double()
        variance = per_row.var(dim=1, unbiased=True) / samples
        meter.add_estimate(estimate, variance, row_bytes(ctx, rb), tokens)
        on_batch()
    return meter.metric()


def chain_rule(model: torch.nn.Module, ctx: Any, spec: MaskedSpec, rows: EvalRows, *, k: int,
               name: str = "chain_rule", on_batch: Callable[[], None] = lambda: None) -> Metric:
    """Exact code length: reveal k tokens per model call, left to right, under the model's
    factorised marginals. A normalised distribution over each row, hence ``kind: exact``."""
    if k < 1:
        raise LmkitError("--opt chain_k must be at least 1")
    sched = spec.schedule
    seq = rows.positions.size(1)
    meter = ctx.meter(name, "exact", {
        "estimator": "left-to-right chain rule, factorised marginals over each block",
        "tokens_per_call": k, "calls_per_sequence": math.ceil(seq / k),
        "sequences": len(rows), "seq_len": seq, "bos_given": spec.anchor_bos,
        "documents": spec.documents, "unscored_tail_tokens": rows.unscored_tail,
    })
    index = torch.arange(seq, device=ctx.device)
    for rb in row_batches(ctx.val_tokens, rows, spec, ctx.batch_size, ctx.device):
        n_maskable = rb.maskable.sum(dim=1).clamp(min=1).float()
        for start in range(0, seq, k):
            hidden = rb.maskable & (index >= start)
            block = hidden & (index < start + k)
            if not block.any():
                continue
            xt = torch.where(hidden, torch.full_like(rb.x0, spec.mask_id), rb.x0)
            frac = hidden.sum(dim=1).float() / n_maskable
            t = (frac / (1 - sched.eps)).clamp(sched.eps, 1.0)
            with ctx.autocast():
                nats = masked_nats(model, xt, rb.x0, block, spec.cond(t))
            meter.add(nats, rb.x0, rb.prev, block, prev2=rb.prev2)
        on_batch()
    return meter.metric()


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

    samples: int = 4           # K stratified times per sequence for the Monte-Carlo NELBOs
    steps: str = "128,512"     # T of the discrete-time bounds ("" = none)
    chain_k: int = 32          # tokens revealed per model call in chain_rule (0 = off)


def evaluate_masked(model: torch.nn.Module, ctx: Any, spec: MaskedSpec) -> list[Metric]:
    """The likelihood metrics every masked denoiser gets, over one set of rows (same tokens)."""
    opts: MaskedEvalOptions = ctx.options
    rows = eval_rows(ctx.val_tokens, ctx.seq_len, spec)
    if ctx.purpose == "validation":
        return [monte_carlo_nelbo(model, ctx, spec, rows, samples=2, steps=None,
                                  seed=ctx.seed, name="nelbo_mc")]
    steps = parse_steps(opts.steps)
    n_batches = math.ceil(len(rows) / ctx.batch_size)
    total = n_batches * (1 + len(steps) + (1 if opts.chain_k else 0))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        ctx.progress(done, total)

    metrics = [monte_carlo_nelbo(model, ctx, spec, rows, samples=opts.samples, steps=None,
                                 seed=ctx.seed, name="nelbo_mc", on_batch=tick)]
    for i, T in enumerate(steps):
        metrics.append(monte_carlo_nelbo(model, ctx, spec, rows, samples=opts.samples, steps=T,
                                         seed=ctx.seed + 1 + i, name=f"nelbo_T{T}",
                                         on_batch=tick))
    if opts.chain_k:
        metrics.append(chain_rule(model, ctx, spec, rows, k=opts.chain_k, on_batch=tick))
    return metrics
