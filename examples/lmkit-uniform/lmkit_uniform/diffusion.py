"""Uniform-noise discrete diffusion (D3PM-uniform / UDLM), scored by an honest T-step bound.

Forward process: each token independently survives to time t with probability α(t) = 1 − t and
is otherwise replaced by a uniformly random id (which may be itself):

    q(x_t | x_0) = α(t)·onehot(x_0) + (1 − α(t))/V,       q(x_t | x_s) likewise with α(t)/α(s).

There is no MASK token: a corrupted token looks like any other, so the model must find the
noise as well as fix it. α(1) = 0 makes x_1 exactly uniform, so the prior term of the bound is 0.

Reverse step (D3PM's x0-parameterisation): with the model's guess p̃(x_0 | x_t),

    p_θ(x_s = k | x_t) ∝ q(x_t | x_s = k) · (α(s)·p̃(k) + (1 − α(s))/V),

the exact posterior q(x_s | x_t, x_0) with x_0 replaced by the guess. Every step, and the last
one to x_0 (s = 0), is a normalised distribution over the V real ids, so the chain is a proper
generative model and its T-step negative ELBO

    NELBO_T(x_0) = Σ_{i=1..T} E_{q(x_t | x_0)} KL(q(x_s | x_t, x_0) ‖ p_θ(x_s | x_t)),
    with t = i/T and s = (i−1)/T,

is an upper bound on its exact code length (at i = 1 the KL is −log p_θ(x_0 | x_{1/T})). It is
estimated by Monte Carlo over steps (K stratified steps per sequence, each KL exact over the
vocabulary), which gives the standard error; bytes come from core's exact LUT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lmkit import (
    Batch,
    EvalContext,
    LmkitError,
    LossOutput,
    Metric,
    ModelConfig,
    SampleContext,
    SampleResult,
    TokenSpec,
    Transformer,
)
from torch import Tensor

T_SCALE = 1000.0  # the model sees 1000·t: the trunk's sinusoidal time embedding resolves that


# -- the process ---------------------------------------------------------------------------------
def alpha(t: Tensor) -> Tensor:
    """Probability that a token is still clean at time t (linear schedule, α(0)=1, α(1)=0)."""
    return 1 - t


def corrupt(x0: Tensor, t: Tensor, vocab: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw x_t ~ q(x_t | x_0): keep each token with probability α(t), else a uniform id."""
    keep = torch.rand(x0.shape, generator=generator, device=x0.device) < alpha(t).unsqueeze(-1)
    noise = torch.randint(vocab, x0.shape, generator=generator, device=x0.device)
    return torch.where(keep, x0, noise)


def _log_onehot_mix(ids: Tensor, keep: Tensor, like: Tensor) -> Tensor:
    """log(keep·onehot(ids) + (1 − keep)/V) for every id, ``[B, L, V]``; keep is one per row."""
    vocab = like.size(-1)
    keep = keep.to(like.dtype).view(-1, 1, 1)
    out = torch.log((1 - keep) / vocab).expand_as(like).clone()
    on = torch.log(keep + (1 - keep) / vocab).expand(*ids.shape, 1)
    return out.scatter(-1, ids.unsqueeze(-1), on)


def reverse_log_probs(logp_x0: Tensor, xt: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """log p_θ(x_s | x_t), ``[B, L, V]``, from the model's log p̃(x_0 | x_t) (0 ≤ s < t ≤ 1)."""
    vocab = logp_x0.size(-1)
    a_s = alpha(s).to(logp_x0.dtype).view(-1, 1, 1)
    log_guess = torch.logaddexp(torch.log(a_s) + logp_x0, torch.log((1 - a_s) / vocab))
    bridge = _log_onehot_mix(xt, alpha(t) / alpha(s), logp_x0)  # log q(x_t | x_s = k)
    return torch.log_softmax(bridge + log_guess, dim=-1)


def posterior_log_probs(x0: Tensor, xt: Tensor, s: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """log q(x_s | x_t, x_0), ``[B, L, V]`` (−inf where impossible, e.g. everything but x_0 at
    s = 0)."""
    bridge = _log_onehot_mix(xt, alpha(t) / alpha(s), like)
    return torch.log_softmax(bridge + _log_onehot_mix(x0, alpha(s), like), dim=-1)


def step_kl(logp_x0: Tensor, x0: Tensor, xt: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """KL(q(x_s | x_t, x_0) ‖ p_θ(x_s | x_t)) in nats per position, ``[B, L]``, exact over V."""
    log_q = posterior_log_probs(x0, xt, s, t, logp_x0)
    log_p = reverse_log_probs(logp_x0, xt, s, t)
    q = log_q.exp()
    return (torch.special.xlogy(q, q) - q * log_p).sum(dim=-1)


def stratified_steps(n: int, steps: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Tensor:
    """n step indices in 1..T, one per stratum of equal width with a shared offset: a batch (or
    a sequence's K samples) always spans the whole chain."""
    u = torch.rand((), generator=generator, device=device)
    strata = (torch.arange(n, device=device) + u) / n
    return (strata * steps).floor().long().clamp(max=steps - 1) + 1


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise LmkitError(f"--opt steps={text!r}: expected comma-separated integers, "
                         "e.g. steps=100,1000") from None
    if not steps or min(steps) < 1:
        raise LmkitError(f"--opt steps={text!r}: give at least one T >= 1")
    return steps


# -- the objective -------------------------------------------------------------------------------
@dataclass
class UniformOptions:
    steps: int = 1000  # T of the discrete-time bound trained on (and reported at validation)


@dataclass
class UniformEvalOptions:
    samples: int = 4  # K stratified steps per sequence (>= 2: the standard error needs two)
    steps: str = ""   # T of the reported bounds, comma-separated ("" = the training T)


class UniformDiffusion:
    name = "uniform"
    description = ("uniform-noise discrete diffusion (D3PM/UDLM): T-step NELBO with the exact "
                   "posterior")
    special_tokens: tuple[str, ...] = ()  # uniform noise needs no MASK
    Options = UniformOptions
    EvalOptions = UniformEvalOptions

    def __init__(self, options: UniformOptions, tokens: TokenSpec):
        if options.steps < 1:
            raise LmkitError(f"options.steps (T) must be at least 1, got {options.steps}")
        self.options, self.vocab = options, tokens.vocab_size

    def configure_model(self, cfg: ModelConfig) -> ModelConfig:
        cfg.causal = False   # the denoiser sees the whole noisy sequence
        cfg.time_cond = True  # and knows how noisy it is
        return cfg

    def step_nats(self, model: Transformer, x0: Tensor, i: Tensor, steps: int,
                  generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
        """T·KL of step i per position on a fresh x_t ~ q(x_t | x_0): with i uniform on 1..T,
        an unbiased estimate of the per-position NELBO_T."""
        t = i.double() / steps
        s = (i.double() - 1) / steps
        xt = corrupt(x0, t, self.vocab, generator)
        logits = model(xt, T_SCALE * t.float())
        logp_x0 = F.log_softmax(logits.to(dtype), dim=-1)
        return steps * step_kl(logp_x0, x0, xt, s, t)

    def loss(self, model: Transformer, batch: Batch) -> LossOutput:
        x0 = batch.tokens[:, 1:]
        i = stratified_steps(x0.size(0), self.options.steps, device=x0.device)
        return LossOutput(self.step_nats(model, x0, i, self.options.steps).mean())

    def evaluate(self, model: Transformer, ctx: EvalContext) -> list[Metric]:
        if ctx.purpose == "validation":  # quick: the training T, two samples per sequence
            return [self.nelbo(model, ctx, self.options.steps, 2, ctx.seed)]
        samples = ctx.options.samples
        if samples < 2:
            raise LmkitError(f"--opt samples={samples}: need at least 2 for a standard error")
        steps = parse_steps(ctx.options.steps) if ctx.options.steps else [self.options.steps]
        return [self.nelbo(model, ctx, T, samples, ctx.seed + j) for j, T in enumerate(steps)]

    def nelbo(self, model: Transformer, ctx: EvalContext, steps: int, samples: int,
              seed: int) -> Metric:
        """NELBO_T over contiguous ``seq_len`` windows of the validation stream, in bpb."""
        val, seq = ctx.val_tokens, ctx.seq_len
        n_rows = (val.numel() - 1) // seq
        if n_rows < 1:
            raise LmkitError(f"the validation prefix holds {val.numel() - 1} targets, fewer than "
                             f"one window of {seq}; raise --max-tokens")
        positions = 1 + torch.arange(n_rows * seq).view(n_rows, seq)  # stream index per target
        gen = torch.Generator(device=ctx.device).manual_seed(seed)
        meter = ctx.meter(f"nelbo_T{steps}", "upper_bound", {
            "estimator": f"discrete-time NELBO, T={steps}, Monte Carlo over steps, exact KL",
            "process": "uniform noise, alpha(t) = 1 - t, x0-parameterised reverse steps",
            "steps": steps, "samples_per_sequence": samples, "sequences": n_rows, "seq_len": seq,
            "seed": seed, "prior_nats_per_token": 0.0,
            "unscored_tail_tokens": val.numel() - 1 - n_rows * seq,
        })
        for b in range(0, n_rows, ctx.batch_size):
            pos = positions[b:b + ctx.batch_size]
            x0 = val[pos].to(ctx.device)
            rows = x0.size(0)
            per_row = torch.empty(rows, samples, dtype=torch.float64, device=ctx.device)
            step_i = torch.stack([stratified_steps(samples, steps, gen, ctx.device)
                                  for _ in range(rows)])  # [rows, K]
            for k in range(samples):
                with ctx.autocast():
                    nats = self.step_nats(model, x0, step_i[:, k], steps, gen, torch.float64)
                per_row[:, k] = nats.sum(dim=1)
            # each row's estimate covers its targets' stream positions; core counts their bytes
            meter.add_estimate_positions(pos.to(ctx.device), per_row.mean(dim=1),
                                         per_row.var(dim=1) / samples)
            ctx.progress(min(b + ctx.batch_size, n_rows), n_rows)
        return meter.metric()


# -- the sampler ---------------------------------------------------------------------------------
def gumbel_argmax(logp: Tensor, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """One draw per row of ``logp`` by the Gumbel-max trick, noise in ``dtype`` (float64)."""
    u = torch.rand(logp.shape, generator=generator, device=logp.device, dtype=dtype)
    gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(dtype).tiny)))
    return (logp.to(dtype) + gumbel).argmax(dim=-1)


class UniformAncestral:
    """Ancestral sampling of the reverse chain: x_1 uniform, then T steps of p_θ(x_s | x_t).

    The prompt is clamped at every step (the model always sees it clean); temperature scales
    the model's x_0 logits. Every draw comes from ``ctx.generator`` in float64.
    """

    name = "uniform_ancestral"
    description = "ancestral sampling of the uniform-noise reverse chain (T steps)"
    objectives = ("uniform",)

    def sample(self, model: Transformer, ctx: SampleContext) -> SampleResult:
        steps, n_prompt = ctx.steps, ctx.prompt.numel()
        if steps < 1:
            raise LmkitError(f"--steps must be at least 1, got {steps}")
        if ctx.top_k or ctx.top_p < 1:
            raise LmkitError("uniform_ancestral supports --temperature only (not top-k/top-p)")
        if n_prompt + ctx.length > ctx.context:
            raise LmkitError(f"prompt + --length = {n_prompt + ctx.length} exceeds the "
                             f"{ctx.context} tokens this model was trained on")
        dtype = ctx.dtype or torch.float64
        prompt = ctx.prompt.to(ctx.device).long().expand(ctx.num, -1)
        x = torch.randint(ctx.tokens.vocab_size, (ctx.num, n_prompt + ctx.length),
                          generator=ctx.generator, device=ctx.device)
        x[:, :n_prompt] = prompt
        for i in range(steps, 0, -1):
            t = torch.full((ctx.num,), i / steps, dtype=torch.float64, device=ctx.device)
            with ctx.autocast():
                logits = model(x, T_SCALE * t.float()).to(dtype)
            if ctx.temperature > 0:
                logits = logits / ctx.temperature
            s = torch.full_like(t, (i - 1) / steps)
            logp = reverse_log_probs(F.log_softmax(logits, dim=-1), x, s, t)
            if ctx.temperature == 0:
                x = logp.argmax(dim=-1)
                gumbel_argmax(logp, ctx.generator, dtype)  # keep the generator in step
            else:
                x = gumbel_argmax(logp, ctx.generator, dtype)
            x[:, :n_prompt] = prompt
        return SampleResult(tokens=x, detail={"steps": steps})
