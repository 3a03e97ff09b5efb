"""The NELBO estimators against exact values, quadrature and each other, on fixed-weight models.

``NeighbourModel`` is a hand-written SUBS denoiser (no training, no randomness): a masked position
is predicted from its nearest visible left neighbour (counting sequences: the token d places on
is that neighbour + d), with a confidence that falls with the distance d and depends on the time
input. Its masked cross-entropy therefore depends strongly on the mask set and on t, and one
forward pass costs microseconds, so quadratures and many-seed coverage checks are cheap.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from lmkit.core.bpb import ByteLUT
from lmkit.core.masking import (
    LogLinearSchedule,
    MaskedSpec,
    any_order_table,
    chain_rule,
    chain_rule_nats,
    eval_rows,
    keyed_uniforms,
    mask_tokens,
    masked_nats,
    monte_carlo_nelbo,
    nelbo_draw,
    nelbo_rows,
    row_batches,
)
from lmkit.protocols import EvalContext

V, SEQ, EPS = 16, 32, 1e-3


class NeighbourModel(torch.nn.Module):
    """p(x_i | x_t) from the nearest visible left neighbour; uniform when there is none.

    ``forward_hidden`` returns the logits themselves and ``logits`` is the identity, which is all
    the estimators use. ``strength`` 0 gives the uniform predictor (every masked token costs
    exactly ln V).
    """

    def __init__(self, vocab: int = V, mask_id: int = V, strength: float = 4.0,
                 time_cond: bool = True, eps: float = EPS):
        super().__init__()
        self.vocab, self.mask_id, self.strength = vocab, mask_id, strength
        self.time_cond, self.eps = time_cond, eps

    def forward_hidden(self, xt: torch.Tensor, cond: torch.Tensor | None = None,
                       segments: torch.Tensor | None = None) -> torch.Tensor:
        # segments: a document-mode row is one document then its PAD tail, which lies to the
        # right, so the nearest visible token to the left is always in the document
        B, T = xt.shape
        pos = torch.arange(T).expand(B, T)
        visible = xt < self.vocab
        last = torch.where(visible, pos, torch.full_like(pos, -1)).cummax(dim=1).values
        left = torch.cat([torch.full((B, 1), -1), last[:, :-1]], dim=1)  # nearest visible < i
        d = (pos - left).float()
        guess = (xt.gather(1, left.clamp(min=0)) + (pos - left)) % self.vocab
        conf = self.strength * torch.exp(-(d - 1) / 3)
        if self.time_cond:  # t from sigma = -log(1 - (1 - eps) t): sharper at low noise
            t = -torch.expm1(-cond.double()).float() / (1 - self.eps)
            conf = conf * (1.5 - t).unsqueeze(1)
        conf = torch.where(left >= 0, conf, torch.zeros_like(conf))
        logits = torch.zeros(B, T, self.vocab)
        return logits.scatter(2, guess.clamp(max=self.vocab - 1).unsqueeze(2), conf.unsqueeze(2))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, xt: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_hidden(xt, cond)


def counting_stream(n: int, seed: int, vocab: int = V) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out, pos = torch.empty(n, dtype=torch.long), 0
    while pos < n:
        length = int(torch.randint(5, 40, (1,), generator=gen))
        start = int(torch.randint(0, vocab, (1,), generator=gen))
        chunk = (start + torch.arange(length)) % vocab
        out[pos:pos + length] = chunk[: n - pos]
        pos += length
    return out


def spec_for(vocab: int = V, time_cond: bool = True, **kw) -> MaskedSpec:
    return MaskedSpec(mask_id=vocab, vocab_size=vocab, bos_id=1, pad_id=vocab + 1,
                      schedule=LogLinearSchedule(EPS), time_input="sigma" if time_cond else None,
                      **kw)


def context(val: torch.Tensor, batch_size: int = 64, seq: int = SEQ) -> EvalContext:
    lut = ByteLUT(base_bytes=torch.ones(64, dtype=torch.long),
                  leading_space=torch.zeros(64, dtype=torch.bool),
                  boundary=torch.zeros(64, dtype=torch.bool))
    return EvalContext(val_tokens=val, seq_len=seq, batch_size=batch_size,
                       device=torch.device("cpu"), autocast=contextlib.nullcontext, lut=lut,
                       tokens=None, seed=0, purpose="eval", options=None)


VAL = counting_stream(48 * SEQ + 1, seed=1)


def estimate_nats(model, spec, ctx, *, estimator, samples, steps=None, seed=0):
    rows = eval_rows(ctx.val_tokens, ctx.seq_len, spec)
    est = nelbo_rows(model, ctx, spec, rows, samples=samples, steps=steps, seed=seed,
                     stream=f"test/{estimator}", estimator=estimator)
    return float(est.nats.sum()), math.sqrt(float(est.var.sum()))


def quadrature_nats(model, spec, ctx, *, steps=None, nodes=16, draws=8, seed=7):
    """Σ over rows of ∫₀¹ (1/t) E[Σ_masked CE] dt (Gauss-Legendre, or the exact sum over the T
    steps), E by plain Bernoulli masks from mask_tokens: none of the estimators' machinery."""
    sched = spec.schedule
    rows = eval_rows(ctx.val_tokens, ctx.seq_len, spec)
    if steps is None:
        x, w = np.polynomial.legendre.leggauss(nodes)
        ts, ws = (x + 1) / 2, w / 2
    else:
        ts, ws = np.arange(1, steps + 1) / steps, np.full(steps, 1 / steps)
    gen = torch.Generator().manual_seed(seed)
    batches = list(row_batches(ctx.val_tokens, rows, spec, 10_000, ctx.device))
    total, var = 0.0, 0.0
    for t, wt in zip(ts, ws, strict=True):
        values = []
        for _ in range(draws):
            s = 0.0
            for rb in batches:
                tt = torch.full((rb.x0.size(0),), float(t))
                xt, masked = mask_tokens(rb.x0, sched.mask_prob(tt), rb.maskable, spec.mask_id,
                                         gen)
                s += float(masked_nats(model, xt, rb.x0, masked, spec.cond(tt)).double().sum())
            values.append(s / t)
        total += wt * float(np.mean(values))
        var += wt**2 * float(np.var(values, ddof=1)) / draws
    tokens = sum(int(rb.maskable.sum()) for rb in batches)
    return total + sched.prior_nats_per_token(spec.vocab_size) * tokens, math.sqrt(var)


# -- the weights and the time posterior are exact ------------------------------------------------
def test_any_order_mask_size_law_is_the_incomplete_beta():
    """n's law is P_n / (L(1−ε)), P_n = ∫₀^c Beta(m; n, L−n+1) dm = P(Binomial(L, c) ≥ n); every
    draw's weight is then L(1−ε) per mean masked cross-entropy (the uniform predictor's NELBO,
    L(1−ε) ln V, plus the prior L·ε·ln V is exactly L ln V, with zero variance)."""
    L, c = 13, 1 - EPS
    sched = LogLinearSchedule(EPS)
    table = any_order_table(L, sched, None)
    pmf = torch.diff(table.n_cdf, prepend=torch.zeros(1, dtype=torch.float64))
    m = np.linspace(0, c, 400_001)
    for k in range(1, L + 1):
        dens = math.comb(L, k) * k * m ** (k - 1) * (1 - m) ** (L - k)  # Beta(n, L-n+1)
        assert float(pmf[k - 1]) * L * c == pytest.approx(np.trapezoid(dens, m), rel=1e-7)
    maskable = torch.ones(4096, L, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(4096, 2 * L + 2, dtype=torch.float64, generator=gen)
    v = (torch.arange(4096, dtype=torch.float64) + 0.5) / 4096
    masked, t, weight = nelbo_draw(u, v, maskable, sched, estimator="any_order", steps=None)
    n = masked.sum(dim=1)
    torch.testing.assert_close(weight * n, torch.full((4096,), L * c, dtype=torch.float64))
    counts = torch.bincount(n, minlength=L + 1)[1:].double() / 4096
    torch.testing.assert_close(counts, pmf, atol=1.5 / 4096, rtol=0)  # stratified: exact-ish
    assert float(t.min()) > 0 and float(t.max()) <= 1


def test_discrete_any_order_law_is_the_sum_over_steps():
    L, T, c = 9, 5, 1 - EPS
    table = any_order_table(L, LogLinearSchedule(EPS), T)
    pmf = torch.diff(table.n_cdf, prepend=torch.zeros(1, dtype=torch.float64))
    w = [[k / i * math.comb(L, k) * (c * i / T) ** k * (1 - c * i / T) ** (L - k)
          for i in range(1, T + 1)] for k in range(1, L + 1)]
    w_n = [sum(row) for row in w]
    assert sum(w_n) == pytest.approx(L * c, rel=1e-12)  # total mass: L(1−ε), as in continuous t
    for k in range(L):
        assert float(pmf[k]) == pytest.approx(w_n[k] / sum(w_n), rel=1e-10)
        cdf = np.cumsum(w[k]) / w_n[k]
        np.testing.assert_allclose(table.i_cdf[k].numpy(), cdf, rtol=1e-10)


def test_time_input_follows_the_posterior_of_the_mask_rate():
    L, c = 13, 1 - EPS
    sched = LogLinearSchedule(EPS)
    B = 20_000
    maskable = torch.ones(B, L, dtype=torch.bool)
    gen = torch.Generator().manual_seed(3)
    m = np.linspace(0, c, 400_001)
    for k in (1, 6, 13):
        u = torch.rand(B, 2 * L + 2, dtype=torch.float64, generator=gen)
        v = torch.full((B,), (k - 0.5) / L, dtype=torch.float64)
        _, t, _ = nelbo_draw(u, v, maskable, sched, estimator="any_order", steps=None)
        dens = m ** (k - 1) * (1 - m) ** (L - k)  # Beta(n, L-n+1) truncated at c, t = m / c
        mean = np.trapezoid(dens * m / c, m) / np.trapezoid(dens, m)
        second = np.trapezoid(dens * (m / c) ** 2, m) / np.trapezoid(dens, m)
        se = math.sqrt((second - mean**2) / B)
        assert abs(float(t.mean()) - mean) < 4 * se, (k, float(t.mean()), mean)
        assert float(t.max()) <= 1.0
    # the time form's mask sets are never empty and have the Binomial(L, m) law given n >= 1
    u = torch.rand(B, 2 * L + 2, dtype=torch.float64, generator=gen)
    v = torch.full((B,), 0.7, dtype=torch.float64)                 # t = 0.3
    masked, t, weight = nelbo_draw(u, v, maskable, sched, estimator="time", steps=None)
    n = masked.sum(dim=1)
    mm = c * 0.3
    p1 = 1 - (1 - mm) ** L
    assert n.min() >= 1
    assert float(n.double().mean()) == pytest.approx(L * mm / p1, rel=0.01)
    assert float(weight[0]) == pytest.approx(p1 / 0.3, rel=1e-12)


def test_weights_are_bounded():
    """The any-order value weighs the mean masked cross-entropy by L·(1-eps); the time form
    weighs the masked cross-entropy sum by P(n>=1)/t <= L·(1-eps) (the old 1/t: up to 1/eps)."""
    sched = LogLinearSchedule(EPS)
    L = SEQ
    maskable = torch.ones(4096, L, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    for estimator, steps in (("any_order", None), ("any_order", 8), ("time", None), ("time", 8),
                             ("time", 128)):
        u = torch.rand(4096, 2 * L + 2, dtype=torch.float64, generator=gen)
        v = torch.rand(4096, dtype=torch.float64, generator=gen)
        masked, _, weight = nelbo_draw(u, v, maskable, sched, estimator=estimator, steps=steps)
        if estimator == "any_order":
            torch.testing.assert_close(weight * masked.sum(dim=1),
                                       torch.full_like(weight, L * (1 - EPS)))
        else:
            assert float(weight.max()) <= L * (1 - EPS) * (1 + 1e-12)
            assert float(weight.min()) > 0 and int(masked.sum(dim=1).min()) >= 1


# -- the estimators agree with each other and with quadrature -------------------------------------
def test_uniform_predictor_gives_exactly_L_ln_V():
    model, spec = NeighbourModel(strength=0.0), spec_for()
    ctx = context(VAL)
    tokens = (VAL.numel() - 1) // SEQ * SEQ
    for estimator in ("any_order", "time"):
        nats, se = estimate_nats(model, spec, ctx, estimator=estimator, samples=8)
        assert abs(nats - tokens * math.log(V)) < 3 * se + 1e-6 * nats, estimator


@pytest.mark.parametrize("steps", [None, 16, 64])
def test_estimators_agree_with_each_other_and_with_quadrature(steps):
    model, spec = NeighbourModel(), spec_for()
    ctx = context(VAL)
    quad, quad_se = quadrature_nats(model, spec, ctx, steps=steps, nodes=16, draws=8)
    results = {e: estimate_nats(model, spec, ctx, estimator=e, samples=32, steps=steps)
               for e in ("any_order", "time")}
    uniform = ((VAL.numel() - 1) // SEQ * SEQ) * math.log(V)
    assert quad < 0.7 * uniform  # the model really uses context: a meaningful comparison
    for name, (value, se) in results.items():
        assert se < 0.015 * value, (name, se, value)
        assert abs(value - quad) < 3 * math.hypot(se, quad_se), (name, value, se, quad, quad_se)
    (a, sa), (b, sb) = results.values()
    assert abs(a - b) < 3 * math.hypot(sa, sb)


@pytest.mark.parametrize(("samples", "replicates"), [(2, 2), (6, 2), (8, 4)])
def test_every_design_estimates_the_same_integral(samples, replicates):
    """Singles, odd strata (a pair and a middle draw) and more replicates: all unbiased."""
    model, spec = NeighbourModel(), spec_for()
    ctx = context(VAL)
    quad, quad_se = quadrature_nats(model, spec, ctx)
    rows = eval_rows(ctx.val_tokens, ctx.seq_len, spec)
    est = nelbo_rows(model, ctx, spec, rows, samples=samples * 4, steps=None, seed=3,
                     stream="design", replicates=replicates * 4)
    value, se = float(est.nats.sum()), math.sqrt(float(est.var.sum()))
    assert abs(value - quad) < 3 * math.hypot(se, quad_se), (value, se, quad, quad_se)


def test_discrete_bound_lies_above_the_continuous_one_for_this_model():
    """c̄(t) grows with t for NeighbourModel, so the T-step bound is a right Riemann sum above
    the integral, approaching it as T grows."""
    model, spec = NeighbourModel(), spec_for()
    ctx = context(VAL)
    cont, cs = estimate_nats(model, spec, ctx, estimator="any_order", samples=32)
    coarse, s2 = estimate_nats(model, spec, ctx, estimator="time", samples=32, steps=2)
    fine, s8 = estimate_nats(model, spec, ctx, estimator="any_order", samples=32, steps=64)
    assert coarse - fine > 3 * math.hypot(s2, s8)
    assert fine - cont > -3 * math.hypot(s8, cs)


# -- honest standard errors ----------------------------------------------------------------------
@pytest.mark.slow  # seconds; the default run keeps its cheaper siblings
def test_two_stderr_intervals_cover_the_precise_value():
    """Over 200 seeds, ±2 stderr of the default design (K=4: 2 replicates × 2 strata) covers a
    value 16× more precise at least 90 % of the time (95 % expected)."""
    model, spec = NeighbourModel(), spec_for()
    ctx = context(VAL[: 16 * SEQ + 1])
    for estimator in ("any_order", "time"):
        ref, ref_se = estimate_nats(model, spec, ctx, estimator=estimator, samples=1024,
                                    seed=10**6)
        hits, ses = 0, []
        for seed in range(200):
            value, se = estimate_nats(model, spec, ctx, estimator=estimator, samples=4,
                                      seed=seed)
            hits += abs(value - ref) <= 2 * math.hypot(se, ref_se)
            ses.append(se)
        assert ref_se < np.mean(ses) / 10
        assert hits / 200 >= 0.9, (estimator, hits)


def test_stderr_tracks_the_spread_across_seeds():
    model, spec = NeighbourModel(), spec_for()
    ctx = context(VAL[: 16 * SEQ + 1])
    values, ses = [], []
    for seed in range(150):
        value, se = estimate_nats(model, spec, ctx, estimator="any_order", samples=4, seed=seed)
        values.append(value)
        ses.append(se)
    ratio = np.std(values, ddof=1) / math.sqrt(np.mean(np.square(ses)))
    assert 0.8 < ratio < 1.2, ratio


# -- reproducible draws ----------------------------------------------------------------------
def test_keyed_uniforms_depend_only_on_seed_stream_row_and_sample():
    a = keyed_uniforms(3, "s", [5, 6, 7], 4, 10)
    b = keyed_uniforms(3, "s", [7], 2, 10)
    assert torch.equal(a[2, :2], b[0])
    assert not torch.equal(keyed_uniforms(4, "s", [5], 1, 10)[0], a[0, :1])
    assert not torch.equal(keyed_uniforms(3, "t", [5], 1, 10)[0], a[0, :1])
    assert not torch.equal(a[0, 0], a[0, 1]) and not torch.equal(a[0], a[1])


def test_row_values_do_not_depend_on_batch_size_or_prefix():
    model, spec = NeighbourModel(), spec_for()
    rows = eval_rows(VAL, SEQ, spec)
    out = {}
    for bs in (1, 8, 32, 128):
        ctx = context(VAL, batch_size=bs)
        est = nelbo_rows(model, ctx, spec, rows, samples=4, steps=None, seed=5, stream="x")
        out[bs] = est
        assert torch.equal(est.nats, out[1].nats) and torch.equal(est.var, out[1].var)
    short = VAL[: 10 * SEQ + 7]
    est = nelbo_rows(model, context(short, batch_size=3), spec, eval_rows(short, SEQ, spec),
                     samples=4, steps=None, seed=5, stream="x")
    assert torch.equal(est.nats, out[1].nats[:10])
    metrics = [monte_carlo_nelbo(model, context(VAL, batch_size=bs), spec, rows, samples=4,
                                 steps=16, seed=5, name="nelbo_T16").to_dict()
               for bs in (8, 32, 128)]
    assert metrics[0] == metrics[1] == metrics[2]
    d = metrics[0]["detail"]
    assert d["seed"] == 5 and d["stream"] == "nelbo_T16/any_order" and d["form"] == "any_order"
    assert d["replicates"] == 2 and d["strata"] == 2 and d["free_information"] == []


# -- chain rule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["strided", "left_to_right"])
def test_chain_rule_is_a_normalised_distribution(order):
    """Σ over every sequence of exp(-code length) = 1: an exact code, for both orders."""
    vocab, L = 3, 5
    model = NeighbourModel(vocab=vocab, mask_id=vocab, strength=2.0)
    spec = spec_for(vocab=vocab)
    grids = torch.meshgrid(*[torch.arange(vocab)] * L, indexing="ij")
    x0 = torch.stack([g.flatten() for g in grids], dim=1)      # all 3^5 sequences
    maskable = torch.ones_like(x0, dtype=torch.bool)
    for k in (1, 2, 3):
        nats = chain_rule_nats(model, spec, x0, maskable, k=k, order=order)
        total = torch.exp(-nats.double().sum(dim=1)).sum()
        assert float(total) == pytest.approx(1.0, abs=1e-5), (order, k)


def test_strided_chain_rule_reveals_each_position_after_exactly_the_earlier_calls():
    model, spec = NeighbourModel(), spec_for()
    ctx = context(VAL[: 4 * SEQ + 1])
    rows = eval_rows(ctx.val_tokens, SEQ, spec)
    rb = next(row_batches(ctx.val_tokens, rows, spec, 64, ctx.device))
    k, s = 4, SEQ // 4
    nats = chain_rule_nats(model, spec, rb.x0, rb.maskable, k=k, order="strided")
    manual = torch.zeros_like(nats)
    for j in range(s):
        hidden = (torch.arange(SEQ) % s) >= j
        xt = torch.where(hidden, torch.full_like(rb.x0, spec.mask_id), rb.x0)
        t = torch.full((4,), float(hidden.sum()) / SEQ / (1 - EPS)).clamp(max=1.0)
        logp = torch.log_softmax(model(xt, spec.cond(t)), dim=-1)
        cols = torch.arange(j, SEQ, s)
        manual[:, cols] = -logp[:, cols].gather(-1, rb.x0[:, cols].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(nats, manual)
    metric = chain_rule(model, ctx, spec, rows, k=k)
    assert metric.kind == "exact" and metric.detail["calls_per_sequence"] == s
    assert metric.detail["order"] == "strided"


def test_free_information_is_named():
    model = NeighbourModel()
    val = VAL.clone()
    val[::40] = 1  # document starts (BOS = 1)
    for kw, expected in (({}, []), ({"anchor_bos": True}, ["bos_anchor"]),
                         ({"anchor_bos": True, "documents": True},
                          ["bos_anchor", "document_boundaries"])):
        spec = spec_for(**kw)
        rows = eval_rows(val, SEQ, spec)
        m = monte_carlo_nelbo(model, context(val), spec, rows, samples=2, steps=None, seed=0,
                              name="nelbo_mc")
        assert m.detail["free_information"] == expected
        if kw.get("documents"):
            assert m.detail["padding_slots"] == rows.padding() > 0
