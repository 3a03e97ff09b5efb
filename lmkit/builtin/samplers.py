"""The built-in samplers: AR ancestral (KV cache), MDLM ancestral (plain and cached), confidence.

Registered through ``register_samplers`` like any third-party sampler. Every random draw comes
from ``ctx.generator`` in float64 (see :mod:`lmkit.core.sampling`), so a seed fixes the output.

Samplers say what they need, not which objectives they serve: the diffusion samplers require the
``masked`` capability (an objective that declares it exposes a
:class:`~lmkit.core.masking.MaskedSpec` as ``objective.spec``: ``mdlm``, ``maskrecon`` or any
third-party masked objective); the model is conditioned on ``spec.cond(t)`` (σ(t) for a
time-conditioned MDLM, nothing for ``maskrecon``). The trunk has no logits for MASK or PAD, so
neither can ever be drawn. The AR sampler requires ``next_token`` (exact next-token logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lmkit.core.masking import MaskedSpec
from lmkit.core.sampling import DEFAULT_DTYPE, sample_tokens
from lmkit.core.trunk import Transformer
from lmkit.errors import LmkitError
from lmkit.protocols import SampleContext, SampleResult


def draw(logits: Tensor, ctx: SampleContext) -> tuple[Tensor, Tensor]:
    """Sample ids (and their log-probs) from logits with the request's filters, in float64."""
    return sample_tokens(logits, ctx.generator, temperature=ctx.temperature, top_k=ctx.top_k,
                         top_p=ctx.top_p, dtype=ctx.dtype or DEFAULT_DTYPE)


def start_rows(ctx: SampleContext, fill: int | None = None) -> Tensor:
    """``[num, P + length]``: the prompt, then ``fill`` (or nothing if None) in every row."""
    prompt = ctx.prompt.to(ctx.device).long().expand(ctx.num, -1)
    if fill is None:
        return prompt.clone()
    tail = torch.full((ctx.num, ctx.length), fill, dtype=torch.long, device=ctx.device)
    return torch.cat([prompt, tail], dim=1)


# -- autoregressive --------------------------------------------------------------------------------
@dataclass
class ARSamplerOptions:
    use_cache: bool = True  # False: recompute the whole prefix for every token (for checking)


class ARSampler:
    name = "ar"
    description = "ancestral next-token sampling (temperature, top-k, top-p) with a KV cache"
    requires = ("next_token",)
    Options = ARSamplerOptions
    bench_variants = {"ar (kv cache)": {"use_cache": True}, "ar (no cache)": {"use_cache": False}}

    def sample(self, model: Transformer, ctx: SampleContext) -> SampleResult:
        use_cache = ctx.options.use_cache if ctx.options is not None else True
        x = start_rows(ctx)
        cache = model.new_cache(x.size(1) + ctx.length) if use_cache else None
        new = x  # what the next call reads: the whole prefix, or only the newest token
        for _ in range(ctx.length):
            with ctx.autocast():
                hidden = model.forward_hidden(new if use_cache else x, cache=cache)
                logits = model.logits(hidden[:, -1])
            token, _ = draw(logits, ctx)
            x = torch.cat([x, token.unsqueeze(1)], dim=1)
            new = token.unsqueeze(1)
        return SampleResult(x, detail={"kv_cache": use_cache})


# -- masked diffusion ------------------------------------------------------------------------------
def masked_spec(ctx: SampleContext, sampler: str) -> MaskedSpec:
    spec = getattr(ctx.objective, "spec", None)
    if not isinstance(spec, MaskedSpec):
        raise LmkitError(f"sampler {sampler!r} needs a masked-diffusion run (an objective with a "
                         f"MaskedSpec `spec`), not {getattr(ctx.objective, 'name', '?')!r}; "
                         "pick another --sampler (see `lmkit samplers`)")
    return spec


MAX_STEPS = 100_000  # denoising steps: beyond this a sampler runs for days


def check_steps(ctx: SampleContext) -> int:
    if not 1 <= ctx.steps <= MAX_STEPS:
        raise LmkitError(f"--steps must be between 1 and {MAX_STEPS:,}, got {ctx.steps:,}")
    return ctx.steps


def masked_time(n_masked: int, length: int, eps: float) -> float:
    """The time t at which the forward process masks ``n_masked`` of ``length`` tokens on average
    (``1 − α(t) = (1−ε)t``), clipped to [ε, 1]: what a reveal-order sampler conditions on."""
    return min(max(n_masked / length / (1 - eps), eps), 1.0)


def denoise(model: Transformer, x: Tensor, spec: MaskedSpec, t: float | Tensor, where: Tensor,
            ctx: SampleContext) -> Tensor:
    """One model call at time t (one float, or one per row); logits [n, V] of the positions in
    ``where`` only."""
    times = t if torch.is_tensor(t) else torch.full((x.size(0),), t)
    cond = spec.cond(times.to(device=x.device, dtype=torch.float32))
    with ctx.autocast():
        hidden = model.forward_hidden(x, cond)
        return model.logits(hidden[where])


@dataclass
class DDPMOptions:
    remask: float = 0.0  # ReMDM-cap η: re-mask a revealed token with min(η, (1−α_s)/α_t) per step


def check_remask(ctx: SampleContext) -> float:
    eta = ctx.options.remask if ctx.options is not None else 0.0
    if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):  # NaN fails both comparisons
        raise LmkitError(f"--opt remask={eta}: the re-masking probability η must be between 0 "
                         "and 1 (0 = plain ddpm; ReMDM uses small values such as 0.01)")
    return float(eta)


class DDPMSampler:
    """MDLM ancestral sampling with the SUBS posterior over T steps, t = 1 → 0.

    At step t → s every masked token is revealed with probability (α_s − α_t)/(1 − α_t) to a draw
    from the model's x0 distribution; visible tokens stay. Per step the generator gives one
    float64 uniform per position (the reveal), then Gumbels for the revealed positions only;
    these depend on x_t alone, so ``ddpm_cache`` consumes exactly the same draws.

    ``--opt remask=η`` is ReMDM's max-capped schedule (Wang et al. 2025, "ReMDM-cap"): a
    generated token visible at t is re-masked with σ_t = min(η, (1 − α_s)/α_t) and a masked one
    revealed with (α_s − (1 − σ_t)α_t)/(1 − α_t), which keeps the forward marginal α_s at every
    step, so the sampler can undo a token it regrets. The same uniform decides both (a position
    is either masked or visible), so no draw is added: η = 0 is plain ``ddpm`` bit for bit.
    σ_s is 0 on the last step (α_0 = 1), which reveals every token still masked.
    """

    name = "ddpm"
    description = ("MDLM ancestral sampling, SUBS posterior, T steps (one model call per step); "
                   "--opt remask=η re-masks revealed tokens (ReMDM-cap)")
    requires = ("masked",)
    Options = DDPMOptions
    bench_options = ({"remask": 0.02},)  # rows of their own: they change the tokens
    skip_idle_steps = False

    def sample(self, model: Transformer, ctx: SampleContext) -> SampleResult:
        spec = masked_spec(ctx, self.name)
        steps, sched, eta = check_steps(ctx), spec.schedule, check_remask(ctx)
        x = start_rows(ctx, fill=spec.mask_id)
        generated = torch.zeros_like(x, dtype=torch.bool)
        generated[:, ctx.prompt.numel():] = True
        idle = remasked = 0
        for i in range(steps, 0, -1):
            masked = x == spec.mask_id
            t, s = i / steps, (i - 1) / steps
            alpha_t, alpha_s = 1 - (1 - sched.eps) * t, 1 - (1 - sched.eps) * s
            sigma = min(eta, (1 - alpha_s) / alpha_t)  # 0.0 exactly when η = 0
            p_reveal = (alpha_s - (1 - sigma) * alpha_t) / (1 - alpha_t)
            u = torch.rand(x.shape, generator=ctx.generator, device=x.device,
                           dtype=ctx.dtype or DEFAULT_DTYPE)
            reveal = masked & (u < p_reveal)
            hide = generated & ~masked & (u < sigma) if sigma > 0 else None
            if not reveal.any():
                idle += 1
                if self.skip_idle_steps:
                    remasked += self._hide(x, hide, spec.mask_id)
                    continue
            logits = denoise(model, x, spec, t, reveal, ctx)
            if reveal.any():
                x[reveal], _ = draw(logits, ctx)
            remasked += self._hide(x, hide, spec.mask_id)
        detail = {"steps": steps, "idle_steps": idle}
        if eta > 0:
            detail |= {"remask": eta, "remasked": remasked}
        return SampleResult(x, detail=detail)

    @staticmethod
    def _hide(x: Tensor, hide: Tensor | None, mask_id: int) -> int:
        """Re-mask the positions in ``hide`` (decided on x_t, applied to x_s); how many."""
        if hide is None:
            return 0
        x[hide] = mask_id
        return int(hide.sum())


class DDPMCacheSampler(DDPMSampler):
    """``ddpm`` without the model calls whose output nothing reads.

    A step that reveals no token leaves x unchanged and never reads the x0 distribution, so its
    model call is skipped; the next call sees the same x_t (the cache of MDLM's ``ddpm_cache``).
    Deciding the reveals before calling the model makes this exact even for a σ-conditioned
    model, where reusing a distribution computed at an earlier t would not be. Tokens equal
    ``ddpm``'s under the same seed; NFE ≤ min(T, tokens generated in the batch).
    """

    name = "ddpm_cache"
    description = "ddpm that skips the model call on steps that reveal nothing (same tokens)"
    skip_idle_steps = True
    same_tokens_as = "ddpm"
    bench_options = ()  # ddpm's remask row is enough; the unit tests check the cache with it


@dataclass
class ConfidenceOptions:
    schedule: str = "linear"  # tokens revealed per step: "linear" (LLaDA) or "cosine" (MaskGIT)


def reveal_counts(length: int, steps: int, schedule: str) -> list[int]:
    """Tokens to reveal at each of ``min(steps, length)`` steps; they sum to ``length``."""
    steps = min(steps, length)
    if schedule == "linear":
        base, extra = divmod(length, steps)
        return [base + (1 if k < extra else 0) for k in range(steps)]
    if schedule == "cosine":  # masked after step k: length * cos(pi/2 * k/steps)
        left = [math.floor(length * math.cos(math.pi / 2 * k / steps)) for k in range(steps + 1)]
        counts, revealed = [], 0
        for k in range(1, steps + 1):  # at least one per step, never more than remain
            target = max(length - left[k], revealed + 1)
            counts.append(min(target, length - (steps - k)) - revealed)
            revealed += counts[-1]
        return counts
    raise LmkitError(f"--opt schedule={schedule!r}: use linear or cosine")


class ConfidenceSampler:
    """Reveal the most confident masked positions first (MaskGIT / LLaDA low-confidence).

    Each step draws a candidate token for every masked position, then keeps the candidates with
    the highest probability under the distribution they were drawn from; the rest stay masked.
    The model sees t = the masked fraction (through σ(t) if it is time-conditioned).
    """

    name = "confidence"
    description = "reveal the most confident masked positions first (MaskGIT/LLaDA), S steps"
    requires = ("masked",)
    Options = ConfidenceOptions

    def sample(self, model: Transformer, ctx: SampleContext) -> SampleResult:
        spec = masked_spec(ctx, self.name)
        schedule = ctx.options.schedule if ctx.options is not None else "linear"
        counts = reveal_counts(ctx.length, check_steps(ctx), schedule)
        x = start_rows(ctx, fill=spec.mask_id)
        eps = spec.schedule.eps
        for k in counts:
            masked = x == spec.mask_id
            # every row has the same number masked
            t = masked_time(int(masked[0].sum()), ctx.length, eps)
            ids, logp = draw(denoise(model, x, spec, t, masked, ctx), ctx)
            candidate, confidence = x.clone(), torch.full(x.shape, -math.inf,
                                                          dtype=logp.dtype, device=x.device)
            candidate[masked], confidence[masked] = ids, logp
            best = confidence.topk(k, dim=1).indices
            x.scatter_(1, best, candidate.gather(1, best))
        return SampleResult(x, detail={"steps": len(counts), "schedule": schedule})
