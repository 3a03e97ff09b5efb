"""Tests for Muon and the optimizer split (lmkit.core.optim)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lmkit.core.optim import (
    Muon,
    OptimConfig,
    build_optimizers,
    muon_momentum,
    newton_schulz,
    set_schedule,
)
from lmkit.core.trunk import ModelConfig, Transformer
from lmkit.errors import LmkitError

TINY = ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=2, cond_dim=16)
VOCAB = 64


def loss_fn(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: enough of an objective to exercise the optimizers."""
    logits = model(idx[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())


def train(
    model: Transformer, opts: list, idx: torch.Tensor, steps: int, cfg: OptimConfig, start: int = 0
) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        set_schedule(opts, cfg, step, lr_mult=1.0)
        loss = loss_fn(model, idx)
        loss.backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_newton_schulz_is_nearly_orthogonal(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) * 3.0
    x = newton_schulz(g, steps=5)
    assert x.shape == g.shape and x.dtype == torch.bfloat16
    s = torch.linalg.svdvals(x.float())
    assert s.min() > 0.5 and s.max() < 1.5
    # It keeps the singular vectors: x is close to U V^T of g.
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    cos = F.cosine_similarity(x.float().flatten(), (u @ vt).flatten(), dim=0)
    assert cos > 0.9


def test_muon_momentum_warmup():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(250) == pytest.approx(0.90)
    assert muon_momentum(500) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)
    assert muon_momentum(3, warmup_steps=0) == 0.95


def test_muon_step_matches_the_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    w0 = w.detach().clone()
    opt = Muon([w], lr=0.1, momentum=0.5)
    g1, g2 = torch.randn(8, 4), torch.randn(8, 4)
    for g in (g1, g2):
        w.grad = g.clone()
        opt.step()
    buf1 = g1
    u1 = newton_schulz(g1 + 0.5 * buf1) * 2**0.5  # sqrt(rows/cols) for a tall matrix
    buf2 = 0.5 * buf1 + g2
    u2 = newton_schulz(g2 + 0.5 * buf2) * 2**0.5
    torch.testing.assert_close(w.detach(), w0 - 0.1 * u1.float() - 0.1 * u2.float())
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.ones(3))])


@pytest.mark.parametrize(
    "mcfg",
    [TINY, dataclasses.replace(TINY, tie_embeddings=False, time_cond=True, causal=False)],
)
@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_every_parameter_in_exactly_one_group(mcfg, name):
    model = Transformer(mcfg, VOCAB, n_special=1)
    opts = build_optimizers(model, OptimConfig(name=name, weight_decay=0.1))
    seen = [id(p) for opt in opts for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}
    for opt in opts:
        for g in opt.param_groups:
            assert g["lr"] == g["base_lr"] > 0


def test_muon_mode_split():
    model = Transformer(dataclasses.replace(TINY, tie_embeddings=False, time_cond=True), VOCAB)
    cfg = OptimConfig(name="muon")
    muon, adam = build_optimizers(model, cfg)
    assert isinstance(muon, Muon) and isinstance(adam, torch.optim.Adam)
    matrices = muon.param_groups[0]["params"]
    assert len(matrices) == 6 * TINY.n_layer and all(p.ndim == 2 for p in matrices)
    assert muon.param_groups[0]["base_lr"] == cfg.matrix_lr
    groups = {g["name"]: g for g in adam.param_groups}
    assert groups["embed"]["params"] == [model.embed.weight] and groups["embed"]["lr"] == 0.05
    assert groups["head"]["params"] == [model.head.weight] and groups["head"]["lr"] == 0.008
    scalar_ids = {id(p) for p in groups["scalar"]["params"]}
    assert id(model.blocks[0].adaln.weight) in scalar_ids  # AdaLN goes to Adam, not Muon
    assert id(model.time_embed.fc1.weight) in scalar_ids
    assert all(g["weight_decay"] == 0 for g in adam.param_groups)


def test_adamw_decay_groups():
    model = Transformer(dataclasses.replace(TINY, time_cond=True), VOCAB)
    (opt,) = build_optimizers(model, OptimConfig(name="adamw", weight_decay=0.1))
    groups = {g["name"]: g for g in opt.param_groups}
    decay = {id(p) for p in groups["decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert id(model.embed.weight) in decay and id(model.blocks[0].adaln.weight) in decay
    assert id(model.skip_weights) not in decay and id(model.blocks[0].resid_mix) not in decay
    assert all(
        p.ndim == 1 or p is model.skip_weights or p.shape[0] == 2
        for p in groups["no_decay"]["params"]
    )


def test_schedule_sets_lr_and_momentum():
    model = Transformer(TINY, VOCAB)
    cfg = OptimConfig(name="muon")
    opts = build_optimizers(model, cfg)
    set_schedule(opts, cfg, step=250, lr_mult=0.5)
    assert opts[0].param_groups[0]["lr"] == pytest.approx(0.02)
    assert opts[0].param_groups[0]["momentum"] == pytest.approx(0.90)
    assert {g["lr"] for g in opts[1].param_groups} == {0.025, 0.02}


def test_unknown_optimizer_names_the_option():
    with pytest.raises(LmkitError, match="optim.name"):
        build_optimizers(Transformer(TINY, VOCAB), OptimConfig(name="sgd"))


@pytest.mark.parametrize(
    "cfg",
    [OptimConfig(name="adamw", lr=3e-3), OptimConfig(name="muon", muon_momentum_warmup=20)],
    ids=["adamw", "muon"],
)
def test_tiny_model_overfits_a_fixed_batch(cfg):
    torch.manual_seed(0)
    model = Transformer(TINY, VOCAB)
    idx = torch.randint(0, VOCAB, (4, 33))
    opts = build_optimizers(model, cfg)
    losses = train(model, opts, idx, steps=50, cfg=cfg)
    assert losses[0] > 3.5  # about ln(64) = 4.16 at init
    assert losses[-1] < 1.0  # memorised: far below the unigram loss of random tokens


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_state_dict_round_trip_is_bitwise(name):
    cfg = OptimConfig(name=name, weight_decay=0.1 if name == "adamw" else 0.0)
    mcfg = dataclasses.replace(TINY, time_cond=False, tie_embeddings=(name == "muon"))
    torch.manual_seed(0)
    idx = torch.randint(0, VOCAB, (2, 17))

    torch.manual_seed(1)
    straight = Transformer(mcfg, VOCAB)
    straight_opts = build_optimizers(straight, cfg)
    train(straight, straight_opts, idx, 6, cfg)

    torch.manual_seed(1)
    first = Transformer(mcfg, VOCAB)
    first_opts = build_optimizers(first, cfg)
    train(first, first_opts, idx, 3, cfg)
    model_state = {k: v.clone() for k, v in first.state_dict().items()}
    opt_states = [opt.state_dict() for opt in first_opts]

    torch.manual_seed(99)  # a fresh model with different weights, then restored
    resumed = Transformer(mcfg, VOCAB)
    resumed.load_state_dict(model_state)
    resumed_opts = build_optimizers(resumed, cfg)
    for opt, state in zip(resumed_opts, opt_states, strict=True):
        opt.load_state_dict(state)
    train(resumed, resumed_opts, idx, 3, cfg, start=3)

    for (name_a, a), (name_b, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert name_a == name_b and torch.equal(a, b), name_a
