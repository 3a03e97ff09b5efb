"""A third-party masked objective, written only against lmkit's public API, gets the built-in
masked samplers (ddpm, ddpm_cache, confidence, entropy_bounded, block) and the shared estimators
without any edit to the built-ins: samplers serve capabilities, not objective names."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import lmkit
from lmkit.core import registry as registry_mod
from lmkit.core.generate import resolve_sampler, served_by
from lmkit.testing import objective_contract, sampler_contract
from tests.conftest import registered_plugin


@dataclass
class HalfOptions:
    eps: float = 1e-3


class HalfMasked:
    """Masked diffusion whose loss only looks at the first half of the schedule: a different
    objective from mdlm, built from the public masking helpers."""

    name = "halfmasked"
    description = "test: masked diffusion on t in [eps, 0.5], time-agnostic"
    special_tokens = ("MASK", "PAD")
    capabilities = ("masked",)
    Options = HalfOptions
    EvalOptions = lmkit.MaskedEvalOptions

    def __init__(self, options, tokens):
        self.spec = lmkit.masked_spec(tokens, options.eps, None, anchor_bos=False,
                                      documents=False)

    def configure_model(self, cfg):
        cfg.causal, cfg.time_cond = False, False
        return cfg

    def loss(self, model, batch):
        x0, maskable = lmkit.training_rows(batch, self.spec)
        t = 0.5 * lmkit.stratified_times(x0.size(0), self.spec.schedule.eps, device=x0.device)
        xt, masked = lmkit.mask_tokens(x0, self.spec.schedule.mask_prob(t), maskable,
                                       self.spec.mask_id)
        nats = lmkit.masked_nats(model, xt, x0, masked, None)
        return lmkit.LossOutput(nats.sum() / masked.sum().clamp(min=1))

    def evaluate(self, model, ctx):
        return lmkit.evaluate_masked(model, ctx, self.spec)


@pytest.fixture
def halfmasked():
    with registered_plugin("halfmasked", objectives=[HalfMasked]):
        yield


def test_masked_samplers_serve_a_third_party_masked_objective(halfmasked):
    samplers = registry_mod.get_registry().entries["sampler"]
    for name in ("ddpm", "ddpm_cache", "confidence", "entropy_bounded", "block"):
        assert "halfmasked" in served_by(samplers[name])
        assert resolve_sampler("halfmasked", name).name == name
    assert "halfmasked" not in served_by(samplers["ar"])
    assert resolve_sampler("halfmasked", None).name == "ddpm"


@pytest.mark.slow
def test_the_third_party_masked_objective_passes_every_contract(halfmasked, tiny_data, tmp_path):
    objective_contract("halfmasked", tiny_data, tmp_path / "o")
    for name in ("ddpm", "ddpm_cache", "confidence", "entropy_bounded", "block"):
        assert sampler_contract(name, tiny_data, tmp_path / name,
                                objectives=["halfmasked"]) == ["halfmasked"]
