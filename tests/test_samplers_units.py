"""Sampling utilities and the trunk's KV cache, without trained runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmkit.core import sampling
from lmkit.core.generate import SampleRequest, generate, resolve_sampler, served_by
from lmkit.core.registry import Registry, get_registry
from lmkit.core.trunk import ModelConfig, Transformer, count_params
from lmkit.errors import LmkitError
from lmkit.plugins.samplers import reveal_counts
from lmkit.protocols import SampleResult, TokenSpec

TINY = ModelConfig(n_layer=5, d_model=32, n_head=4, n_kv_head=2)


def randomized(cfg: ModelConfig, vocab: int = 50) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg, vocab).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # give the zero-initialised branches weights
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


# -- KV cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes", [{}, {"unet_skips": False, "x0_mix": False,
                                          "n_kv_head": 4, "tie_embeddings": False}])
def test_kv_cache_matches_the_full_forward(changes):
    model = randomized(dataclasses.replace(TINY, **changes))
    idx = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)  # 20 > seq_len 16: RoPE grows as without a cache
        cache = model.new_cache(20)
        parts = [model(idx[:, :5], cache=cache), model(idx[:, 5:9], cache=cache)]  # chunks
        parts += [model(idx[:, i:i + 1], cache=cache) for i in range(9, 20)]  # one at a time
    assert cache.pos == 20 and len(cache.k) == model.cfg.n_layer
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-5, rtol=1e-5)


def test_kv_cache_leaves_the_parameters_alone():
    assert count_params(Transformer(ModelConfig(), 1024)) == 17_059_912
    a, b = Transformer(TINY, 50), Transformer(TINY, 50)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert not any("cache" in n for n, _ in a.state_dict().items())


def test_kv_cache_needs_a_causal_model_and_room():
    with pytest.raises(LmkitError, match="needs a causal model"):
        Transformer(dataclasses.replace(TINY, causal=False), 50).new_cache(8)
    model = Transformer(TINY, 50).eval()
    cache = model.new_cache(4)
    with torch.no_grad(), pytest.raises(LmkitError, match="holds 4 positions, 5"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


# -- float64 sampling and filters -----------------------------------------------------------------
def test_sampling_draws_float64_by_default():
    assert sampling.DEFAULT_DTYPE == torch.float64
    gen = sampling.make_generator(0)
    assert sampling.gumbel((3, 4), gen).dtype == torch.float64
    assert sampling.filter_logits(torch.randn(3, 5)).dtype == torch.float64
    logits = torch.randn(64, 100)
    ids, logp = sampling.sample_tokens(logits, sampling.make_generator(5))
    u = torch.rand((64, 100), generator=sampling.make_generator(5), dtype=torch.float64)
    manual = (torch.log_softmax(logits.double(), -1) - torch.log(-torch.log(u))).argmax(-1)
    assert torch.equal(ids, manual) and logp.dtype == torch.float64
    as32, _ = sampling.sample_tokens(logits, sampling.make_generator(5), dtype=torch.float32)
    assert not torch.equal(as32, ids)  # a float32 draw is another draw


def test_samplers_get_float64_through_the_context():
    seen = {}

    class Spy:
        name, description, objectives = "spy", "records its context", ("*",)

        def sample(self, model, ctx):
            seen["dtype"] = ctx.dtype
            seen["gen"] = ctx.generator.initial_seed()
            return SampleResult(torch.cat([ctx.prompt.expand(ctx.num, -1),
                                           torch.zeros(ctx.num, ctx.length, dtype=torch.long)], 1))

    model = Transformer(TINY, 50)
    entry = types_entry(Spy)
    generate(model, entry, objective=None, tokens=TokenSpec(50, 1), prompt=torch.tensor([1]),
             context=16, request=SampleRequest(num=2, length=3, seed=11))
    assert seen == {"dtype": torch.float64, "gen": 11}


def types_entry(cls):
    from lmkit.core.registry import Entry

    return Entry("sampler", cls.name, cls, "test", "test", "0")


def test_filters_temperature_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda lp: torch.isfinite(lp)[0].tolist()  # noqa: E731
    assert keep(sampling.filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert keep(sampling.filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert keep(sampling.filter_logits(logits, top_p=0.8)) == [True, True, False, False]
    assert keep(sampling.filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    p = sampling.filter_logits(logits, top_p=0.8).exp()
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0, 0]], dtype=torch.float64))
    hot = sampling.filter_logits(logits, temperature=2.0).exp()
    assert hot[0, 3] > 0.05 + 0.05  # flatter
    greedy, _ = sampling.sample_tokens(logits.expand(50, -1), sampling.make_generator(0),
                                       temperature=0.0)
    assert greedy.eq(0).all()
    drawn, _ = sampling.sample_tokens(logits.expand(20000, -1), sampling.make_generator(0))
    freq = torch.bincount(drawn, minlength=4).double() / 20000
    torch.testing.assert_close(freq, logits.exp()[0].double(), atol=0.015, rtol=0)
    for bad in ({"temperature": -1.0, "top_k": 0, "top_p": 1.0},
                {"temperature": 1.0, "top_k": -2, "top_p": 1.0},
                {"temperature": 1.0, "top_k": 0, "top_p": 1.5}):
        with pytest.raises(LmkitError):
            sampling.check_filters(**bad)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_confidence_reveal_counts(schedule):
    for length, steps in ((24, 24), (24, 5), (24, 100), (7, 3), (1, 1)):
        counts = reveal_counts(length, steps, schedule)
        assert sum(counts) == length and min(counts) >= 1 and len(counts) == min(steps, length)
    with pytest.raises(LmkitError, match="schedule"):
        reveal_counts(4, 2, "zigzag")


def test_builtin_samplers_declare_what_they_need_not_whom_they_serve():
    reg = Registry()
    reg.load(entry_points=False)
    needs = {n: e.obj.requires for n, e in reg.entries["sampler"].items()}
    assert needs == {"ar": ("next_token",), "ddpm": ("masked",), "ddpm_cache": ("masked",),
                     "confidence": ("masked",), "entropy_bounded": ("masked",),
                     "block": ("masked",)}
    assert not any(hasattr(e.obj, "objectives") for e in reg.entries["sampler"].values())
    served = {n: served_by(e) for n, e in get_registry().entries["sampler"].items()
              if e.plugin == "lmkit.plugins.samplers"}
    masked = ["mdlm", "maskrecon"]
    assert served == {"ar": ["ar", "mtp"], "ddpm": masked, "ddpm_cache": masked,
                      "confidence": masked, "entropy_bounded": masked, "block": masked}
    assert all(e.plugin == "lmkit.plugins.samplers" for e in reg.entries["sampler"].values())
    assert resolve_sampler("maskrecon", None).name == "ddpm"
