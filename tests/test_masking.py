"""Masked diffusion: the schedule, SUBS, and the estimators cross-checked against each other."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmkit.core.config import resolve_config
from lmkit.core.data import load_val_tokens, open_data
from lmkit.core.evaluate import evaluate_run
from lmkit.core.masking import (
    LogLinearSchedule,
    MaskedSpec,
    chain_rule,
    document_segments,
    eval_rows,
    mask_tokens,
    masked_nats,
    monte_carlo_nelbo,
    padding_share,
    row_batches,
    stratified_times,
)
from lmkit.core.runs import load_run
from lmkit.core.train import train
from lmkit.core.trunk import ModelConfig, Transformer, count_params
from lmkit.protocols import Batch, TokenSpec


def subs_log_probs(logits, xt, mask_id):
    """Reference SUBS parameterisation over the whole vocabulary (the test oracle): log p(x0|xt)
    per position, float32; a visible real token is copied, masked positions get the model's
    distribution, MASK and PAD get no probability."""
    logp = F.log_softmax(logits.float(), dim=-1)
    vocab = logp.size(-1)
    visible = (xt != mask_id) & (xt < vocab)
    copy = torch.full_like(logp, float("-inf"))
    copy.scatter_(-1, xt.clamp(max=vocab - 1).unsqueeze(-1), 0.0)
    return torch.where(visible.unsqueeze(-1), copy, logp)

FAST = ["train.seq_len=32", "train.batch_tokens=512", "train.log_every=10",
        "train.val_tokens=1024", "train.dtype=fp32", "optim.lr=0.01"]
EVAL = {"max_tokens": 2048, "batch_size": 64}


def test_weight_is_one_over_t():
    sched = LogLinearSchedule(eps=1e-3)
    t = torch.linspace(0.001, 1.0, 1000, dtype=torch.float64)
    torch.testing.assert_close(sched.weight(t), 1 / t, rtol=1e-12, atol=0)
    # and it is -alpha'(t) / (1 - alpha(t)) by finite differences of alpha
    h = 1e-6
    dalpha = (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(-dalpha / (1 - sched.alpha(t)), 1 / t, rtol=1e-6, atol=0)
    assert sched.prior_nats_per_token(1024) == pytest.approx(1e-3 * math.log(1024))


def test_stratified_times_cover_the_schedule():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64):
        t = stratified_times(n, 1e-3, generator=gen)
        assert t.min() >= 1e-3 and t.max() <= 1.0
        strata = torch.floor((t - 1e-3) / (1 - 1e-3) * n)
        assert sorted(strata.tolist()) == list(range(n))  # exactly one time per stratum
    many = torch.cat([stratified_times(8, 1e-3, generator=gen) for _ in range(2000)])
    assert abs(float(many.mean()) - (1 + 1e-3) / 2) < 0.01  # uniform on [eps, 1]


def test_mask_tokens_respects_maskable_and_rate():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 50, (64, 200))
    maskable = torch.rand(64, 200, generator=gen) < 0.8
    p = torch.linspace(0, 1, 64)
    xt, masked = mask_tokens(x0, p, maskable, mask_id=99, generator=gen)
    assert not masked[~maskable].any()
    assert torch.equal(xt[masked], torch.full_like(xt[masked], 99))
    assert torch.equal(xt[~masked], x0[~masked])
    rate = masked.sum(1).float() / maskable.sum(1)
    assert torch.corrcoef(torch.stack([rate, p]))[0, 1] > 0.99


def test_subs_invariants():
    torch.manual_seed(0)
    V, mask_id, pad_id = 20, 20, 21
    logits = torch.randn(3, 10, V)
    xt = torch.randint(0, V, (3, 10))
    xt[:, ::3] = mask_id
    xt[0, -1] = pad_id
    logp = subs_log_probs(logits, xt, mask_id)
    assert logp.shape[-1] == V  # MASK and PAD are not even in the output space
    masked = xt == mask_id
    torch.testing.assert_close(logp[masked].logsumexp(-1), torch.zeros(int(masked.sum())))
    visible = (xt != mask_id) & (xt < V)
    rows = logp[visible]
    assert torch.all(rows.gather(-1, xt[visible].unsqueeze(-1)) == 0)  # copy the token
    assert torch.all(rows.exp().sum(-1) == 1)


def test_document_mode_packs_rows_into_segments():
    spec = MaskedSpec(mask_id=100, vocab_size=100, bos_id=1, pad_id=101, documents=True)
    x0 = torch.tensor([[1, 5, 6, 1, 7], [5, 6, 7, 8, 9], [5, 1, 2, 3, 4]])
    assert document_segments(x0, spec).tolist() == [[1, 1, 1, 2, 2], [0] * 5, [0, 1, 1, 1, 1]]
    assert document_segments(x0, MaskedSpec(mask_id=100, vocab_size=100, bos_id=1)) is None
    # stopping each row at the next document would have padded 2 + 0 + 4 of 15 slots
    assert padding_share(x0, spec) == pytest.approx(6 / 15)


@pytest.mark.parametrize("causal", [False, True])
def test_a_packed_document_sees_only_itself(causal):
    """In a packed row each document's hidden states are those of the document alone: another
    document beside it changes nothing (RoPE is relative, so the offset does not matter)."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, n_kv_head=1, causal=causal)
    model = Transformer(cfg, 64, 16).eval()
    with torch.no_grad():  # zero-initialised projections would hide any attention at all
        for p in model.parameters():
            p.normal_(0, 0.3)
    doc_a, doc_b = torch.tensor([1, 5, 9, 13, 2]), torch.tensor([1, 7, 3, 3, 8, 11, 4])
    row = torch.cat([doc_a, doc_b]).unsqueeze(0)
    segments = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed = model.forward_hidden(row, segments=segments)
        alone_a = model.forward_hidden(doc_a.unsqueeze(0))
        alone_b = model.forward_hidden(doc_b.unsqueeze(0))
        unmasked = model.forward_hidden(row)
    torch.testing.assert_close(packed[:, :5], alone_a, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(packed[:, 5:], alone_b, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(unmasked[:, 5:], alone_b, atol=1e-3)  # without: b sees a


def test_eval_rows_score_every_target_once():
    val = torch.tensor([1, 5, 6, 7, 1, 8, 9, 1, 4, 4, 4, 4, 4, 4])
    spec = MaskedSpec(mask_id=100, vocab_size=100, bos_id=1, pad_id=101, documents=True)
    rows = eval_rows(val, 4, spec)
    scored = rows.positions[rows.positions >= 0]
    assert sorted(scored.tolist()) == list(range(1, len(val)))
    for row in rows.positions:  # a row never crosses a document start
        ids = val[row[row >= 0]]
        assert (ids[1:] == 1).sum() == 0
    contiguous = eval_rows(val, 4, MaskedSpec(mask_id=100, vocab_size=100, bos_id=1))
    assert contiguous.positions.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert contiguous.unscored_tail == 1


def test_pg_mdlm_has_the_submissions_parameter_count():
    cfg = resolve_config(preset="pg-mdlm").model
    cfg.causal, cfg.time_cond = False, True
    assert count_params(Transformer(cfg, 1024, n_special=2)) == 32_987_776


# -- estimators cross-checked on a model whose cross-entropy really depends on t ----------------
# "Counting" sequences (x[i+1] = x[i] + 1 mod 60, random restarts) make a masked token easy when
# a neighbour is visible and costly (ln 60) when not, so the bounds separate clearly.
V, SEQ = 64, 32


def counting_stream(n: int, gen: torch.Generator) -> torch.Tensor:
    out, pos = torch.empty(n, dtype=torch.long), 0
    while pos < n:
        length = int(torch.randint(40, 120, (1,), generator=gen))
        start = int(torch.randint(0, 60, (1,), generator=gen))
        chunk = 2 + (start + torch.arange(length)) % 60
        out[pos:pos + length] = chunk[: n - pos]
        pos += length
    return out


def train_synthetic(objective_name: str, steps: int = 150):
    from lmkit.core.registry import get_objective

    cls = get_objective(objective_name).obj
    tokens = TokenSpec(vocab_size=V, bos_id=1, special={"MASK": V, "PAD": V + 1})
    obj = cls(cls.Options(), tokens)
    torch.manual_seed(0)
    cfg = obj.configure_model(ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=4,
                                          cond_dim=32))
    model = Transformer(cfg, V, 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        stream = counting_stream(32 * (SEQ + 1), gen).view(32, SEQ + 1)
        loss = obj.loss(model, Batch(stream, step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return obj, model.eval()


def synthetic_ctx(obj):
    from lmkit.core.bpb import ByteLUT
    from lmkit.protocols import EvalContext

    lut = ByteLUT(base_bytes=torch.ones(128, dtype=torch.long),
                  leading_space=torch.zeros(128, dtype=torch.bool),
                  boundary=torch.zeros(128, dtype=torch.bool))
    val = counting_stream(64 * SEQ + 1, torch.Generator().manual_seed(1))
    return EvalContext(val_tokens=val, seq_len=SEQ, batch_size=64, device=torch.device("cpu"),
                       autocast=contextlib.nullcontext, lut=lut, tokens=None, seed=0,
                       purpose="eval", options=obj.EvalOptions())


@pytest.fixture(scope="module")
def synthetic_mdlm():
    obj, model = train_synthetic("mdlm")
    return obj, model, synthetic_ctx(obj)


def nelbo(obj, model, ctx, *, samples, steps=None, seed=0, estimator="any_order"):
    rows = eval_rows(ctx.val_tokens, ctx.seq_len, obj.spec)
    with torch.no_grad():
        return monte_carlo_nelbo(model, ctx, obj.spec, rows, samples=samples, steps=steps,
                                 seed=seed, name="x", estimator=estimator)


def quadrature_nats(obj, model, ctx, nodes=12, draws=4):
    """Gauss-Legendre over t ∈ [0, 1] of E[Σ_masked CE]/t, the integral nelbo_mc samples."""
    spec = obj.spec
    sched = spec.schedule
    rows = eval_rows(ctx.val_tokens, ctx.seq_len, spec)
    x, w = np.polynomial.legendre.leggauss(nodes)
    a, b = 0.0, 1.0
    ts, ws = (b - a) / 2 * x + (b + a) / 2, (b - a) / 2 * w
    gen = torch.Generator().manual_seed(123)
    total, var = 0.0, 0.0
    batches = list(row_batches(ctx.val_tokens, rows, spec, ctx.batch_size, ctx.device))
    for t, wt in zip(ts, ws, strict=True):
        values = []
        for _ in range(draws):
            s = 0.0
            for rb in batches:
                tt = torch.full((rb.x0.size(0),), float(t))
                xt, masked = mask_tokens(rb.x0, sched.mask_prob(tt), rb.maskable, spec.mask_id,
                                         gen)
                with torch.no_grad():
                    s += float(masked_nats(model, xt, rb.x0, masked, spec.cond(tt)).sum()) / t
            values.append(s)
        total += wt * float(np.mean(values))
        var += wt**2 * float(np.var(values, ddof=1)) / draws
    tokens = sum(int(rb.maskable.sum()) for rb in batches)
    prior = sched.prior_nats_per_token(spec.vocab_size) * tokens
    return total + prior, math.sqrt(var)


def to_nats(metric):
    return metric.value * math.log(2) * metric.bytes, metric.stderr * math.log(2) * metric.bytes


def test_the_synthetic_model_uses_context(synthetic_mdlm):
    obj, model, ctx = synthetic_mdlm
    one, many = nelbo(obj, model, ctx, samples=8, steps=1), nelbo(obj, model, ctx, samples=8)
    assert one.value > 5.0 > 2.0 > many.value  # ln(60)/ln(2) ≈ 5.9 bits when all is masked


@pytest.mark.parametrize("estimator", ["any_order", "time"])
def test_mc_nelbo_agrees_with_quadrature(synthetic_mdlm, estimator):
    obj, model, ctx = synthetic_mdlm
    mc, mc_se = to_nats(nelbo(obj, model, ctx, samples=32, estimator=estimator))
    quad, quad_se = quadrature_nats(obj, model, ctx, nodes=16, draws=4)
    assert abs(mc - quad) < 3 * math.hypot(mc_se, quad_se), (mc, mc_se, quad, quad_se)
    assert mc_se < 0.05 * mc  # a meaningful comparison, not one drowned in noise


def test_discrete_bound_decreases_with_T_towards_the_continuous_one(synthetic_mdlm):
    obj, model, ctx = synthetic_mdlm
    values = {T: nelbo(obj, model, ctx, samples=32, steps=T) for T in (1, 4, 32, 1024)}
    for coarse, fine in ((1, 4), (4, 32)):
        a, b = values[coarse], values[fine]
        assert a.value - b.value > 3 * math.hypot(a.stderr, b.stderr), (coarse, a, fine, b)
    mc, big = nelbo(obj, model, ctx, samples=32, seed=5), values[1024]
    assert abs(big.value - mc.value) < 3 * math.hypot(big.stderr, mc.stderr), (big, mc)


def test_chain_rule_k1_is_the_sum_of_its_steps(synthetic_mdlm):
    obj, model, ctx = synthetic_mdlm
    spec = obj.spec
    rows = eval_rows(ctx.val_tokens[: 4 * SEQ + 1], SEQ, spec)
    with torch.no_grad():
        metric = chain_rule(model, ctx, spec, rows, k=1)
        manual = 0.0
        rb = next(row_batches(ctx.val_tokens, rows, spec, 64, ctx.device))
        for j in range(SEQ):
            xt = rb.x0.clone()
            xt[:, j:] = spec.mask_id
            t = torch.full((4,), (SEQ - j) / SEQ / (1 - spec.schedule.eps)).clamp(max=1.0)
            logp = subs_log_probs(model(xt, spec.cond(t)), xt, spec.mask_id)
            manual -= float(logp[:, j].gather(-1, rb.x0[:, j:j + 1]).sum())
    assert metric.tokens == 4 * SEQ and metric.kind == "exact" and metric.stderr is None
    assert metric.value * math.log(2) * metric.bytes == pytest.approx(manual, rel=1e-5)


def test_chain_rule_is_exact_and_tighter_with_smaller_k(synthetic_mdlm):
    obj, model, ctx = synthetic_mdlm
    rows = eval_rows(ctx.val_tokens, SEQ, obj.spec)
    with torch.no_grad():
        k1, k8 = (chain_rule(model, ctx, obj.spec, rows, k=k) for k in (1, 8))
    assert k1.value < k8.value  # revealing one token per call conditions on more


def test_recon_score_is_above_the_bound_it_is_mistaken_for():
    obj, model = train_synthetic("maskrecon")
    ctx = synthetic_ctx(obj)
    with torch.no_grad():
        score = obj.recon_score(model, ctx)
    quad_nats, _ = quadrature_nats(obj, model, ctx, nodes=8, draws=2)
    assert score.kind == "score" and score.stderr is not None
    assert score.value > quad_nats / math.log(2) / score.bytes


@pytest.fixture(scope="module")
def mdlm_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mdlm") / "run"
    cfg = resolve_config(preset="tiny", flags={"objective": "mdlm", "train.steps": 20,
                                               "data.path": str(tiny_data)}, sets=FAST)
    train(cfg, open_data(tiny_data), run_dir)
    return run_dir


def test_eval_metrics_kinds_bytes_and_reproducibility(mdlm_run, tiny_data):
    opts = {"samples": 2, "steps": "16", "chain_k": 8}
    a = evaluate_run(mdlm_run, options=opts, device="cpu", **EVAL)
    b = evaluate_run(mdlm_run, options=opts, device="cpu", **EVAL)
    assert a["metrics"] == b["metrics"]
    by = {m["name"]: m for m in a["metrics"]}
    assert set(by) == {"nelbo_mc", "nelbo_T16", "chain_rule"}
    assert by["nelbo_mc"]["kind"] == by["nelbo_T16"]["kind"] == "upper_bound"
    assert by["nelbo_mc"]["stderr"] > 0 and by["chain_rule"]["stderr"] is None
    val = load_val_tokens(open_data(tiny_data), EVAL["max_tokens"])
    from lmkit.core.bpb import ByteLUT

    lut = ByteLUT.from_sentencepiece(tiny_data / "tokenizer.model")
    n = (val.numel() - 1) // 32 * 32
    expected = int(lut.target_bytes(val[1:n + 1], val[:n]).sum())
    for m in a["metrics"]:  # same tokens, exact LUT bytes, as the AR `nll` protocol
        assert (m["tokens"], m["bytes"]) == (n, expected)
    c = evaluate_run(mdlm_run, options=opts, device="cpu", seed=99, **EVAL)
    assert c["metrics"][0]["value"] != a["metrics"][0]["value"]  # the seed is really used


def test_mdlm_options_time_cond_anchor_and_documents(tiny_data, tmp_path):
    data = open_data(tiny_data)
    for i, sets in enumerate((["options.time_cond=false"],
                              ["options.anchor_bos=true", "options.documents=true"])):
        cfg = resolve_config(preset="tiny", flags={"objective": "mdlm", "train.steps": 3,
                                                   "data.path": str(tiny_data)},
                             sets=[*FAST, *sets])
        summary = train(cfg, data, tmp_path / f"run{i}")
        assert math.isfinite(summary["val"][0]["value"])
        run = load_run(tmp_path / f"run{i}")
        assert (run.model.time_embed is None) == (i == 0)
        result = evaluate_run(tmp_path / f"run{i}", options={"samples": 2, "steps": "",
                                                             "chain_k": 16}, device="cpu", **EVAL)
        detail = result["metrics"][0]["detail"]
        if i == 0:
            assert detail["free_information"] == []
        if i == 1:
            # anchored BOS tokens are given, not scored: fewer tokens, same bytes (BOS has none)
            assert detail["bos_given"] is True
            assert detail["free_information"] == ["bos_anchor", "document_boundaries"]
            assert all(m["detail"]["free_information"] == detail["free_information"]
                       for m in result["metrics"])
            val = load_val_tokens(data, EVAL["max_tokens"])
            assert result["metrics"][0]["tokens"] == int((val[1:] != data.bos_id).sum())


def test_nelbo_mc_is_identical_for_any_batch_size(mdlm_run):
    """Draws are keyed per (seed, row, sample) and row sums run in row order: the batch size
    changes nothing, to the last digit (issue 13: 2.83940 at one batch size, 2.79715 at
    another)."""
    opts = {"samples": 4, "steps": "16", "chain_k": 8}
    results = [evaluate_run(mdlm_run, options=opts, device="cpu", max_tokens=2048,
                            batch_size=bs)["metrics"] for bs in (8, 32, 128)]
    assert results[0] == results[1] == results[2]
    detail = results[0][0]["detail"]
    assert (detail["seed"], detail["samples_per_sequence"], detail["form"]) == (1337, 4,
                                                                               "any_order")


def test_document_mode_trains_on_every_token_of_packed_rows():
    from lmkit.core.registry import get_objective

    cls = get_objective("mdlm").obj
    tokens = TokenSpec(vocab_size=64, bos_id=1, special={"MASK": 64, "PAD": 65})
    torch.manual_seed(0)
    batch = torch.randint(2, 64, (3, 17))
    batch[0, 5] = 1   # a document starts inside row 0: packed, not padded
    losses = {}
    for documents in (True, False):
        obj = cls(cls.Options(documents=documents), tokens)
        torch.manual_seed(1)
        model = Transformer(obj.configure_model(ModelConfig(n_layer=1, d_model=32, n_head=2,
                                                            n_kv_head=2)), 64, 2)
        with torch.no_grad():  # past the zero init, so documents could see each other
            for p in model.parameters():
                p.normal_(0, 0.3)
        torch.manual_seed(2)
        out = obj.loss(model, Batch(batch, 0))
        assert out.tokens is None  # every target is a real token: the default count holds
        losses[documents] = float(out.loss.detach())
    assert losses[True] != losses[False]  # row 0's documents no longer see each other


def test_mdlm_loss_is_the_per_token_nelbo_estimate():
    """With an exactly uniform predictor every masked token costs ln V, and the 1/t weight
    makes the expected loss (1 - eps) ln V per token whatever the masking rate."""
    from lmkit.core.registry import get_objective

    cls = get_objective("mdlm").obj
    obj = cls(cls.Options(time_cond=False),
              TokenSpec(vocab_size=64, bos_id=1, special={"MASK": 64, "PAD": 65}))
    torch.manual_seed(0)
    model = Transformer(obj.configure_model(ModelConfig(n_layer=1, d_model=32, n_head=2,
                                                        n_kv_head=2)), 64, 2)
    with torch.no_grad():
        model.embed.weight.zero_()  # tied head: all logits 0, a uniform predictor
        losses = [float(obj.loss(model, Batch(torch.randint(2, 64, (16, 257)), 0)).loss)
                  for _ in range(200)]
    mean, se = np.mean(losses), np.std(losses) / np.sqrt(len(losses))
    assert abs(mean - (1 - 1e-3) * math.log(64)) < 3 * se
    assert se < 0.005 * mean


def test_maskrecon_trains_and_reports_its_score_with_the_bounds(tiny_data, tmp_path):
    cfg = resolve_config(preset="tiny", flags={"objective": "maskrecon", "train.steps": 5,
                                               "data.path": str(tiny_data)}, sets=FAST)
    train(cfg, open_data(tiny_data), tmp_path / "run")
    result = evaluate_run(tmp_path / "run", options={"samples": 2, "steps": "", "chain_k": 16},
                          device="cpu", **EVAL)
    by = {m["name"]: m for m in result["metrics"]}
    assert set(by) == {"nelbo_mc", "chain_rule", "recon_score"}
    score = by["recon_score"]
    assert score["kind"] == "score" and "not a likelihood" in score["detail"]["note"]
    assert (score["tokens"], score["bytes"]) == (by["nelbo_mc"]["tokens"], by["nelbo_mc"]["bytes"])
    assert load_run(tmp_path / "run").model.time_embed is None  # no time input
