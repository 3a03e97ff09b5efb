"""Fixed-t masked reconstruction (parameter-golf PR #1596), scored honestly.

Training: t ~ U(0, 1) per sequence, mask each token with probability t, loss = mean cross-entropy
over the masked tokens; the bidirectional trunk gets no time input. The submission's reported
figure, the mean over t ∈ {0.1, 0.3, 0.5, 0.7, 0.9} of ``loss_t / t``, is reproduced as
``recon_score`` with ``kind: score``: dividing by t where the ELBO would not makes it neither a
likelihood nor a bound. The same model also gets the valid bounds and the exact chain rule, and
with ``--opt seed_figures=true`` PR #1241's and #1403's figures (:mod:`lmkit.builtin.seed_figures`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkit.builtin.seed_figures import figure_steps, seed_figures
from lmkit.core.bpb import Metric
from lmkit.core.masking import (
    RNG_DESCRIPTION,
    MaskedEvalOptions,
    common_detail,
    eval_rows,
    evaluate_masked,
    mask_tokens,
    masked_nats,
    masked_spec,
    training_rows,
)
from lmkit.core.masking.fixed import STDERR_METHOD, fixed_time_ce, weighted_mean_score
from lmkit.core.trunk import ModelConfig, Transformer
from lmkit.errors import LmkitError
from lmkit.protocols import Batch, EvalContext, LossOutput, TokenSpec

RECON_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class MaskReconOptions:
    eps: float = 1e-3  # schedule used by the NELBO estimators this model is also scored with


@dataclass
class MaskReconEvalOptions(MaskedEvalOptions):
    recon_score: bool = True  # PR #1596's figure (kind: score)
    seed_figures: bool = False  # also PR #1241's and #1403's figures (kind: score), see docs


class MaskReconObjective:
    name = "maskrecon"
    description = "fixed-t masked reconstruction (PR #1596), no time input; its score + bounds"
    special_tokens: tuple[str, ...] = ("MASK", "PAD")
    capabilities = ("masked",)  # exposes a MaskedSpec as `spec`: the masked samplers serve it
    Options = MaskReconOptions
    EvalOptions = MaskReconEvalOptions

    def __init__(self, options: MaskReconOptions, tokens: TokenSpec):
        self.options = options
        self.spec = masked_spec(tokens, options.eps, None, anchor_bos=False, documents=False)

    def configure_model(self, cfg: ModelConfig) -> ModelConfig:
        cfg.causal = False
        cfg.time_cond = False
        return cfg

    def loss(self, model: Transformer, batch: Batch) -> LossOutput:
        x0, maskable = training_rows(batch, self.spec)
        t = torch.rand(x0.size(0), device=x0.device)
        xt, masked = mask_tokens(x0, t, maskable, self.spec.mask_id)
        nats = masked_nats(model, xt, x0, masked, None)
        return LossOutput(nats.sum() / masked.sum().clamp(min=1))

    def evaluate(self, model: Transformer, ctx: EvalContext) -> list[Metric]:
        if ctx.purpose != "eval":
            return evaluate_masked(model, ctx, self.spec)
        metrics = evaluate_masked(model, ctx, self.spec, figure_steps(ctx.options))
        if ctx.options.recon_score:
            metrics.append(self.recon_score(model, ctx))
        if ctx.options.seed_figures:
            metrics += seed_figures(model, ctx, self.spec, metrics)
        return metrics

    def recon_score(self, model: Transformer, ctx: EvalContext) -> Metric:
        """mean_t (Σ masked CE / #masked) / t over all rows, per token, through the byte meter.

        Row r's masks at the i-th time come from the generator keyed (seed, "recon_score", r, i),
        so the value does not depend on the batch size or the validation prefix. The score is a
        ratio of sums over rows; its standard error is the delta method's, with rows as the
        independent units (it includes the spread between rows, so it is conservative for the
        Monte-Carlo error alone).
        """
        spec = self.spec
        rows = eval_rows(ctx.val_tokens, ctx.seq_len, spec)
        if len(rows) < 2:
            raise LmkitError("recon_score needs at least 2 sequences; raise --max-tokens")
        seed, stream = ctx.seed, "recon_score"
        meter = ctx.meter("recon_score", "score", {
            "estimator": "PR #1596: mean over t of (mean masked cross-entropy at rate t) / t",
            "figure_of": "PR #1596", "reported_as": "val_bpb", "beside": "nelbo_mc",
            "times": list(RECON_TIMES), "seed": seed, "rng": RNG_DESCRIPTION, "stream": stream,
            "note": "a score, not a bpb: not a likelihood or a bound, because the ELBO weights "
                    "the masked cross-entropy sum by 1/t, not its mean, and integrates over "
                    "all of t",
            "stderr_method": STDERR_METHOD,
            **common_detail(spec, rows),
        })
        fc = fixed_time_ce(model, ctx, spec, rows, times=RECON_TIMES, rates=RECON_TIMES,
                           stream=stream, seed=seed)
        weights = [1.0 / (len(RECON_TIMES) * t) for t in RECON_TIMES]
        return weighted_mean_score(meter, fc, weights)
