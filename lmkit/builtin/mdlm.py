"""MDLM: masked diffusion trained on the continuous-time NELBO with the ELBO's own weight.

The parameter-golf MDLM submissions weighted the masked cross-entropy by ``dσ/dt`` (#1106/#1241);
the ELBO's weight is ``dσ/dt / expm1(σ) = −α'/(1−α) = 1/t``. Here the loss is the per-token
Monte-Carlo NELBO with that weight (t stratified over [ε, 1] across the batch, normalised by
1/(1−ε)), so the training curve estimates what ``nelbo_mc`` measures, up to the [0, ε) sliver
(about ε relative; ``nelbo_mc`` integrates over all of [0, 1]) and without the prior term.
Evaluation reports the continuous and discrete-time bounds and the exact chain rule (see
:mod:`lmkit.core.masking`). In document mode (``options.documents``) each training row packs
the documents of its window, each attending only to itself: no padding, every token trained on.
``--opt seed_figures=true`` adds PR #1241's and #1403's own figures
(:mod:`lmkit.builtin.seed_figures`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmkit.builtin.seed_figures import figure_steps, seed_figures
from lmkit.core.bpb import Metric
from lmkit.core.masking import (
    MaskedEvalOptions,
    document_segments,
    evaluate_masked,
    mask_tokens,
    masked_nats,
    masked_spec,
    stratified_times,
    training_rows,
)
from lmkit.core.trunk import ModelConfig, Transformer
from lmkit.protocols import Batch, EvalContext, LossOutput, TokenSpec


@dataclass
class MDLMEvalOptions(MaskedEvalOptions):
    seed_figures: bool = False  # also PR #1241's and #1403's figures (kind: score), see docs


@dataclass
class MDLMOptions:
    eps: float = 1e-3          # log-linear schedule: alpha(t) = 1 - (1 - eps) t
    time_cond: bool = True     # AdaLN conditioning on sigma(t) (off: a time-agnostic denoiser)
    anchor_bos: bool = False   # #1241: BOS is never masked (a given document anchor)
    documents: bool = False    # #1241: no attention across documents (rows packed; eval PADs)


class MDLMObjective:
    name = "mdlm"
    description = "masked diffusion (MDLM): continuous-time NELBO, weight 1/t; bounds, chain rule"
    special_tokens: tuple[str, ...] = ("MASK", "PAD")
    capabilities = ("masked",)  # exposes a MaskedSpec as `spec`: the masked samplers serve it
    Options = MDLMOptions
    EvalOptions = MDLMEvalOptions

    def __init__(self, options: MDLMOptions, tokens: TokenSpec):
        self.options = options
        self.spec = masked_spec(tokens, options.eps, "sigma" if options.time_cond else None,
                                options.anchor_bos, options.documents)

    def configure_model(self, cfg: ModelConfig) -> ModelConfig:
        cfg.causal = False
        cfg.time_cond = self.options.time_cond
        return cfg

    def loss(self, model: Transformer, batch: Batch) -> LossOutput:
        spec, sched = self.spec, self.spec.schedule
        x0, maskable = training_rows(batch, spec)
        t = stratified_times(x0.size(0), sched.eps, device=x0.device)
        xt, masked = mask_tokens(x0, sched.mask_prob(t), maskable, spec.mask_id)
        nats = masked_nats(model, xt, x0, masked, spec.cond(t), document_segments(x0, spec))
        per_row = nats.sum(dim=1) * sched.weight(t)
        loss = per_row.sum() / maskable.sum().clamp(min=1)
        return LossOutput(loss)

    def evaluate(self, model: Transformer, ctx: EvalContext) -> list[Metric]:
        if ctx.purpose != "eval":
            return evaluate_masked(model, ctx, self.spec)
        metrics = evaluate_masked(model, ctx, self.spec, figure_steps(ctx.options))
        if ctx.options.seed_figures:
            metrics += seed_figures(model, ctx, self.spec, metrics)
        return metrics
