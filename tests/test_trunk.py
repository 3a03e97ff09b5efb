"""Tests for the shared transformer trunk (lmkit.core.trunk)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lmkit.core.trunk import (
    ModelConfig,
    Transformer,
    count_params,
    flops_per_token,
    padded_vocab_size,
)
from lmkit.errors import LmkitError

TINY = ModelConfig(n_layer=3, d_model=32, n_head=4, n_kv_head=2, cond_dim=16)


def tiny(**changes) -> ModelConfig:
    return dataclasses.replace(TINY, **changes)


def randomize(model: torch.nn.Module, std: float = 0.2) -> None:
    """Give the zero-initialised branches weights, so every path carries signal."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def test_baseline_param_count():
    model = Transformer(ModelConfig(), 1024)
    assert count_params(model) == 17_059_912
    block = 1_835_008 + 2_056
    assert count_params(model) == 9 * block + 524_288 + 2_048
    assert model.padded_vocab == 1024 and model.skip_weights.shape == (4, 512)


def test_padded_vocab_with_specials():
    model = Transformer(tiny(), 1024, n_special=2)
    assert padded_vocab_size(1024, 2) == 1088
    assert model.padded_vocab == 1088 and model.embed.weight.shape == (1088, 32)
    idx = torch.tensor([[1, 1024, 1025, 5]])  # special ids are valid inputs
    assert model(idx).shape == (1, 4, 1024)
    assert padded_vocab_size(1000) == 1024 and padded_vocab_size(64) == 64


@pytest.mark.parametrize("tie", [True, False])
def test_causal_model_ignores_the_future(tie):
    torch.manual_seed(0)
    model = Transformer(tiny(tie_embeddings=tie), 50).eval()
    randomize(model)
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 7) % 50
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_bidirectional_model_sees_the_future():
    torch.manual_seed(0)
    model = Transformer(tiny(causal=False), 50).eval()
    randomize(model)
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 7) % 50
    a, b = model(idx), model(changed)
    assert (a[:, :8] - b[:, :8]).abs().amax() > 1e-4


def test_gqa_shapes_and_equivalence_with_repeated_heads():
    torch.manual_seed(0)
    model = Transformer(tiny(), 40).eval()
    randomize(model)
    attn = model.blocks[0].attn
    assert attn.q.weight.shape == (32, 32)
    assert attn.k.weight.shape == (2 * 8, 32) and attn.v.weight.shape == (2 * 8, 32)
    assert attn.q_gain.shape == (4,)
    assert torch.all(Transformer(tiny(), 40).blocks[0].attn.q_gain == 1.5)

    # Plain MHA whose k/v heads are the GQA heads repeated must give the same output.
    mha = Transformer(tiny(n_kv_head=4), 40).eval()
    state = model.state_dict()
    for i in range(TINY.n_layer):
        for name in ("k", "v"):
            w = state[f"blocks.{i}.attn.{name}.weight"].view(2, 8, 32)
            state[f"blocks.{i}.attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    idx = torch.randint(0, 40, (2, 10))
    torch.testing.assert_close(model(idx), mha(idx), rtol=1e-5, atol=1e-5)


def test_logits_are_capped_float32_and_tied_to_the_embedding():
    torch.manual_seed(0)
    model = Transformer(tiny(logit_softcap=5.0), 40)
    with torch.no_grad():
        model.embed.weight.mul_(1000)  # huge logits
    out = model(torch.randint(0, 40, (1, 6)))
    assert out.dtype == torch.float32 and out.abs().max() <= 5.0 and out.abs().max() > 4.0
    untied = Transformer(tiny(tie_embeddings=False, logit_softcap=0.0), 40)
    assert untied.head.weight.shape == (64, 32)  # a row per (padded) embedding row
    assert torch.all(untied(torch.randint(0, 40, (1, 6))) == 0)  # zero-init untied head


def test_switches_remove_their_parameters():
    plain = tiny(qk_norm=False, q_gain_init=0.0, unet_skips=False, x0_mix=False, block_scales=False)
    model = Transformer(plain, 40)
    names = {n for n, _ in model.named_parameters()}
    assert not any(k in n for n in names for k in ("q_gain", "skip", "resid_mix", "_scale"))
    assert model(torch.randint(0, 40, (1, 5))).shape == (1, 5, 40)
    gelu = Transformer(tiny(activation="gelu", mlp_mult=3.0), 40)
    assert gelu.blocks[0].mlp.fc.weight.shape == (96, 32)


def test_unet_skips_follow_the_stack_order():
    """Encoder outputs are added in reverse order: the last pushed is the first popped."""
    cfg = tiny(n_layer=4)
    torch.manual_seed(0)
    model = Transformer(cfg, 40).eval()
    randomize(model)
    idx = torch.randint(0, 40, (1, 6))
    with torch.no_grad():
        x = x0 = F.rms_norm(model.embed(idx), (32,))
        cos, sin = model.rotary(6)
        e0 = model.blocks[0](x, x0, cos, sin, None)
        e1 = model.blocks[1](e0, x0, cos, sin, None)
        d0 = model.blocks[2](e1 + model.skip_weights[0] * e1, x0, cos, sin, None)
        d1 = model.blocks[3](d0 + model.skip_weights[1] * e0, x0, cos, sin, None)
        expected = model.logits(F.rms_norm(d1, (32,)))
    torch.testing.assert_close(model(idx), expected)


def test_time_conditioning_starts_as_the_unconditioned_model():
    torch.manual_seed(0)
    base = Transformer(tiny(causal=False), 40).eval()
    randomize(base)
    cond_model = Transformer(tiny(causal=False, time_cond=True), 40).eval()
    missing, unexpected = cond_model.load_state_dict(base.state_dict(), strict=False)
    assert (
        not unexpected
        and missing
        and all(n.startswith("time_embed.") or ".adaln." in n for n in missing)
    )
    idx = torch.randint(0, 40, (3, 8))
    sigma = torch.tensor([0.1, 1.0, 5.0])
    out = cond_model(idx, sigma)
    torch.testing.assert_close(out, base(idx), rtol=0, atol=0)

    with torch.no_grad():  # wake the AdaLN layers up: now sigma must matter
        for name, p in cond_model.named_parameters():
            if "adaln" in name:
                p.normal_(0, 0.1)
    a = cond_model(idx, sigma)
    b = cond_model(idx, sigma.flip(0))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_cond_errors():
    cond_model = Transformer(tiny(time_cond=True), 40)
    plain = Transformer(tiny(), 40)
    idx = torch.randint(0, 40, (2, 5))
    with pytest.raises(LmkitError, match="time_cond"):
        cond_model(idx)
    with pytest.raises(LmkitError, match="time_cond"):
        plain(idx, torch.rand(2))
    with pytest.raises(LmkitError, match="shape"):
        cond_model(idx, torch.rand(3))


@pytest.mark.parametrize(
    "change, option",
    [
        (dict(n_head=5), "n_head"),
        (dict(n_kv_head=3), "n_kv_head"),
        (dict(activation="swish"), "activation"),
        (dict(d_model=36, n_head=12), "d_model"),
    ],
)
def test_bad_config_names_the_option(change, option):
    with pytest.raises(LmkitError, match=option):
        Transformer(tiny(**change), 40)


def test_rope_cache_grows_for_longer_sequences():
    torch.manual_seed(0)
    model = Transformer(tiny(), 40, context=4).eval()
    randomize(model)
    idx = torch.randint(0, 40, (1, 10))
    long_out = model(idx)
    assert model.rotary.cos.size(0) >= 10
    fresh = Transformer(tiny(), 40, context=16).eval()
    fresh.load_state_dict(model.state_dict())  # rope tables are not part of the state
    torch.testing.assert_close(long_out, fresh(idx))


def test_determinism_under_seed():
    def build_and_step() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(7)
        model = Transformer(tiny(), 40)
        idx = torch.randint(0, 40, (2, 8))
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        return loss.detach(), model.blocks[0].attn.q.weight.grad

    (l1, g1), (l2, g2) = build_and_step(), build_and_step()
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_flops_per_token_baseline():
    cfg = ModelConfig()
    n = 17_059_912
    flops = flops_per_token(cfg, n, 1024, 1024)
    assert flops == 6 * n + 12 * 9 * 512 * 1024  # tied: the head is the embedding table
    assert flops_per_token(cfg, n, 2048, 1024) - flops == 12 * 9 * 512 * 1024


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_matches_a_flop_counter(tie):
    """Matmul FLOPs of one fwd+bwd, counted by torch, are the 6*N part of the estimate."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny(tie_embeddings=tie, n_layer=2)
    torch.manual_seed(0)
    model = Transformer(cfg, 100, n_special=1)
    randomize(model)
    B, T = 2, 16
    idx = torch.randint(0, 100, (B, T))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    counts = counter.get_flop_counts()["Global"]
    # the linear layers' matmuls (RMSNorm's backward does a batched row dot, a reduction; on an
    # AVX-512 CPU the chunked causal attention's are batched: bmm and baddbmm)
    linear = {torch.ops.aten.mm, torch.ops.aten.addmm}
    batched = {torch.ops.aten.bmm, torch.ops.aten.baddbmm}
    assert not {op for op in counts if "mm" in str(op)} - linear - batched
    mm = sum(v for op, v in counts.items() if op in linear) / (B * T)
    n_vectors = sum(p.numel() for p in model.param_groups()["scalar"])
    estimate = flops_per_token(cfg, count_params(model), T, 100, n_special=1)
    assert estimate - mm == 12 * cfg.n_layer * cfg.d_model * T + 6 * n_vectors


def test_forward_under_autocast_bf16():
    torch.manual_seed(0)
    model = Transformer(tiny(time_cond=True), 40)
    randomize(model)
    idx = torch.randint(0, 40, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx, torch.rand(2))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.blocks[0].attn.q.weight.dtype == torch.float32


def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break; the eager backend keeps this fast on CPU."""
    torch.manual_seed(0)
    model = Transformer(tiny(time_cond=True, causal=False), 40)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    idx = torch.randint(0, 40, (2, 8))
    sigma = torch.rand(2)
    torch.testing.assert_close(compiled(idx, sigma), model(idx, sigma))
