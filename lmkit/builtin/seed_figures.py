"""The parameter-golf seed submissions' own figures, recomputed on the same model and tokens.

Opt-in (``--opt seed_figures=true`` for ``mdlm`` and ``maskrecon``): each is ``kind: score``,
says in ``detail["note"]`` exactly why it is not bits per byte, and names in
``detail["beside"]`` the honest metric it should be read against, so ``lmkit compare`` can show
what the submission would have printed next to the bound. They are deliberately outside the
byte contract of :mod:`lmkit.testing` (a figure divided by a constant does not halve when the
bytes double): that is what is wrong with them.

* ``pr1241_val_var_bpb`` (PR #1241): the 128-step discrete NELBO in bits divided by
  4.3 × tokens, an assumed 4.3 bytes per token instead of the tokenizer's LUT bytes.
* ``pr1403_truncated_t`` (PR #1403 / #1582): the mean masked cross-entropy integrated over
  t ∈ [0.05, 0.95] only, which drops the ends of the NELBO's integral and under-estimates it.

PR #1596's figure is :meth:`~lmkit.builtin.maskrecon.MaskReconObjective.recon_score`, labelled
the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from lmkit.core.bpb import Metric
from lmkit.core.masking import MaskedSpec, common_detail, eval_rows, parse_steps
from lmkit.core.masking.draws import RNG_DESCRIPTION
from lmkit.core.masking.fixed import STDERR_METHOD, fixed_time_ce, weighted_mean_score
from lmkit.errors import LmkitError

ASSUMED_BYTES_PER_TOKEN = 4.3   # PR #1106 / #1241's hard-coded bytes per token
PR1241_STEPS = 128              # its discrete ELBO's T
TRUNCATION = (0.05, 0.95)       # PR #1403 / #1582's t range
TRUNCATED_PANELS = 9            # midpoint rule: t = 0.1, 0.2, ..., 0.9, each of width 0.1

# what every seed figure copies from the bound it is derived from or read against
_ROW_KEYS = ("protocol", "sequences", "seq_len", "free_information", "bos_given", "documents",
             "padding_slots", "unscored_tail_tokens")


def figure_steps(options: Any) -> list[int] | None:
    """The discrete bounds to compute: ``--opt steps`` plus T=128 when the figures need it
    (None: ``--opt steps`` unchanged)."""
    if not getattr(options, "seed_figures", False):
        return None
    steps = parse_steps(options.steps)
    return steps if PR1241_STEPS in steps else [*steps, PR1241_STEPS]


def pr1241_val_var_bpb(bound: Metric) -> Metric:
    """#1241's "val_var_bpb" from the 128-step bound: its bits over 4.3 × tokens.

    ``bound`` is ``nelbo_T128`` (bits = value × LUT bytes = nats / ln 2); the figure uses the
    same draws and tokens, so it differs from the bound only by the divisor."""
    if bound.detail.get("steps") != PR1241_STEPS:
        raise ValueError(f"PR #1241's figure is derived from the {PR1241_STEPS}-step bound")
    bits = bound.value * bound.bytes                         # = nats / ln 2
    divisor = ASSUMED_BYTES_PER_TOKEN * bound.tokens
    stderr = None if bound.stderr is None else bound.stderr * bound.bytes / divisor
    lut_per_token = bound.bytes / bound.tokens
    return Metric("pr1241_val_var_bpb", "score", bits / divisor, "score", stderr, bound.tokens,
                  bound.bytes, {
                      "estimator": f"PR #1241's figure: the {PR1241_STEPS}-step discrete NELBO "
                                   f"in bits / ({ASSUMED_BYTES_PER_TOKEN} × tokens)",
                      "figure_of": "PR #1241", "reported_as": "val_var_bpb",
                      "beside": bound.name, "derived_from": bound.name,
                      "assumed_bytes_per_token": ASSUMED_BYTES_PER_TOKEN,
                      "lut_bytes_per_token": lut_per_token,
                      "note": f"a score, not a bpb: it divides the bound's bits by an assumed "
                              f"{ASSUMED_BYTES_PER_TOKEN} bytes per token instead of the LUT "
                              f"bytes of the scored tokens ({lut_per_token:.3f} per token "
                              f"here), so it is {bound.name} × {lut_per_token:.3f} / "
                              f"{ASSUMED_BYTES_PER_TOKEN}; #1241 also scored 1.65 % of "
                              "validation with unseeded masks, which is not reproduced (the "
                              f"same seeded draws and tokens as {bound.name})",
                      **{k: bound.detail[k] for k in _ROW_KEYS if k in bound.detail},
                  })


def truncated_t_integral(model: torch.nn.Module, ctx: Any, spec: MaskedSpec) -> Metric:
    """#1403/#1582's figure: ∫ over [0.05, 0.95] of the mean masked cross-entropy, per token.

    ``c̄(t)`` is measured at the midpoints t = 0.1 … 0.9 (mask rate ``(1−ε)t``, the model given
    ``cond(t)``), each weighted by its panel's width 0.1, with keyed draws (stream
    ``pr1403_truncated_t``)."""
    lo, hi = TRUNCATION
    width = (hi - lo) / TRUNCATED_PANELS
    times = [lo + (i + 0.5) * width for i in range(TRUNCATED_PANELS)]
    rows = eval_rows(ctx.val_tokens, ctx.seq_len, spec)
    if len(rows) < 2:
        raise LmkitError("pr1403_truncated_t needs at least 2 sequences; raise --max-tokens")
    stream = "pr1403_truncated_t"
    rates = [float(spec.schedule.mask_prob(torch.tensor(t, dtype=torch.float64))) for t in times]
    meter = ctx.meter(stream, "score", {
        "estimator": f"PR #1403/#1582's figure: the mean masked cross-entropy integrated over "
                     f"t in [{lo}, {hi}] (midpoint rule, {TRUNCATED_PANELS} panels)",
        "figure_of": "PR #1403 / #1582", "reported_as": "truncated-t integral",
        "beside": "nelbo_mc", "times": [round(t, 12) for t in times],
        "weights": [round(width, 12)] * TRUNCATED_PANELS, "mask_rate": "(1-eps) t",
        "time_input": spec.time_input,
        "note": f"a score, not a bpb or a bound: the NELBO integrates (1-eps)·c(t) over all of "
                f"t in [0, 1] (plus the prior term); dropping [0, {lo}) and ({hi}, 1], where "
                "the most-masked positions are the hardest, under-estimates it. The "
                "submissions' own t grid is not reproduced, only the truncation",
        "seed": ctx.seed, "rng": RNG_DESCRIPTION, "stream": stream,
        "stderr_method": STDERR_METHOD, **common_detail(spec, rows),
    })
    fc = fixed_time_ce(model, ctx, spec, rows, times=times, rates=rates, stream=stream,
                       seed=ctx.seed)
    return weighted_mean_score(meter, fc, [width] * TRUNCATED_PANELS)


def seed_figures(model: torch.nn.Module, ctx: Any, spec: MaskedSpec,
                 metrics: list[Metric]) -> list[Metric]:
    """The figures ``--opt seed_figures=true`` adds to a masked objective's metrics."""
    bound = next((m for m in metrics if m.name == f"nelbo_T{PR1241_STEPS}"), None)
    if bound is None:
        raise LmkitError(f"PR #1241's figure needs nelbo_T{PR1241_STEPS}; it was not computed")
    return [pr1241_val_var_bpb(bound), truncated_t_integral(model, ctx, spec)]
