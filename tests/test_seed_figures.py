"""The seeds' own figures: opt-in scores, each checked against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmkit.builtin.seed_figures import ASSUMED_BYTES_PER_TOKEN
from lmkit.core.evaluate import run_evaluation
from lmkit.core.masking import eval_rows, keyed_uniforms
from lmkit.testing import ObjectiveHarness

OPTIONS = {"samples": 2, "steps": "", "chain_k": 0, "seed_figures": True}
ROWS = 5  # sequences of the harness's seq_len scored (a short prefix keeps the tests fast)


@pytest.fixture(scope="module")
def mdlm(tiny_data, tmp_path_factory):
    return ObjectiveHarness("mdlm", tiny_data, tmp_path_factory.mktemp("seedfig"))


def stream(h):
    return h.val_tokens[:ROWS * h.seq_len + 1].clone()


@pytest.fixture(scope="module")
def figures(mdlm):
    return evaluate(mdlm)


def evaluate(h, options=OPTIONS):
    ctx = h.setup.eval_context(stream(h), purpose="eval", options=options,
                               batch_size=8)
    return {m.name: m for m in run_evaluation(h.model, h.objective, ctx)}


def test_seed_figures_are_opt_in(mdlm):
    plain = evaluate(mdlm, {**OPTIONS, "seed_figures": False})
    assert set(plain) == {"nelbo_mc"}  # steps="" asks for no discrete bound


def test_pr1241_figure_is_the_128_step_bound_in_bits_over_4_3_bytes_per_token(figures):
    by = figures
    bound, fig = by["nelbo_T128"], by["pr1241_val_var_bpb"]  # T=128 added for the figure
    assert bound.kind == "upper_bound" and bound.detail["steps"] == 128
    nats = bound.value * math.log(2) * bound.bytes  # bpb = nats / ln 2 / LUT bytes
    assert fig.value == pytest.approx(nats / math.log(2) / (4.3 * bound.tokens), rel=1e-12)
    assert (fig.kind, fig.unit, fig.tokens, fig.bytes) == ("score", "score", bound.tokens,
                                                           bound.bytes)
    assert fig.stderr == pytest.approx(bound.stderr * bound.bytes / (4.3 * bound.tokens))
    assert fig.detail["beside"] == "nelbo_T128" and "not a bpb" in fig.detail["note"]
    assert fig.detail["protocol"] == bound.detail["protocol"] == "non_overlapping"
    # the figure is off by exactly the ratio of the real bytes per token to 4.3
    assert fig.value / bound.value == pytest.approx(bound.bytes / bound.tokens / 4.3)


def test_seed_figures_under_a_uniform_model_match_closed_forms(mdlm):
    """A model that gives every id probability 1/V: every masked position costs ln V, so the
    128-step bound is exactly ln V per token (L(1-eps) ln V + the prior L eps ln V) and the
    truncated integral is 0.9 ln V per token."""
    vocab = mdlm.tokens.vocab_size
    with mdlm.probe(mdlm.setup.lut, kappa=0.0) as probe:
        assert probe.A == pytest.approx(math.log(vocab))
        by = evaluate(mdlm)
    bound, fig, trunc = by["nelbo_T128"], by["pr1241_val_var_bpb"], by["pr1403_truncated_t"]
    assert bound.value * math.log(2) * bound.bytes == pytest.approx(
        bound.tokens * math.log(vocab), rel=1e-6)  # the probe's logits are float32
    assert fig.value == pytest.approx(math.log2(vocab) / ASSUMED_BYTES_PER_TOKEN, rel=1e-6)
    per_token = 0.9 * math.log(vocab)  # ∫ over [0.05, 0.95] of ln V
    assert trunc.value == pytest.approx(per_token * trunc.tokens / math.log(2) / trunc.bytes,
                                        rel=1e-6)
    assert trunc.value < bound.value  # it under-estimates the bound it stands in for


def test_truncated_integral_equals_an_independent_quadrature(mdlm, figures):
    h = mdlm
    trunc = figures["pr1403_truncated_t"]
    spec, sched = h.objective.spec, h.objective.spec.schedule
    val = stream(h)
    rows = eval_rows(val, h.seq_len, spec)
    assert len(rows) == ROWS
    times = np.linspace(0.1, 0.9, 9)  # midpoints of 9 panels of width 0.1 on [0.05, 0.95]
    ce, count = np.zeros(9), np.zeros(9)
    for r in range(len(rows)):  # one row at a time, straight through the model
        x0 = val[rows.positions[r]][None]
        u = keyed_uniforms(h.setup.cfg.train.seed, "pr1403_truncated_t", [r], 9, x0.size(1))
        for i, t in enumerate(times):
            masked = u[0, i][None] < (1 - sched.eps) * t
            xt = torch.where(masked, torch.full_like(x0, spec.mask_id), x0)
            with torch.no_grad():
                logits = h.model.logits(h.model.forward_hidden(
                    xt, spec.cond(torch.tensor([t], dtype=torch.float32))))
            nats = F.cross_entropy(logits[masked].double(), x0[masked], reduction="sum")
            ce[i] += float(nats)
            count[i] += int(masked.sum())
    integral = float(np.sum(0.1 * ce / count))  # nats per token
    tokens = rows.positions.numel()
    assert trunc.tokens == tokens
    assert trunc.value == pytest.approx(integral * tokens / math.log(2) / trunc.bytes, rel=1e-5)
    assert trunc.kind == "score" and trunc.detail["beside"] == "nelbo_mc"
    assert "under-estimates" in trunc.detail["note"]
