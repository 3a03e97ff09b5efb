"""The lmkit.testing contract over every registered objective and sampler, built-in or installed.

The cases are read from the plugin registry at collection time, so an installed third-party
plugin (e.g. ``pip install ./examples/lmkit-uniform``) is checked exactly like the built-ins.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from lmkit import hookimpl
from lmkit.core import registry as registry_mod
from lmkit.core.registry import Registry, get_registry
from lmkit.plugins.ar import ARObjective, token_nats
from lmkit.protocols import Batch, SampleResult
from lmkit.testing import (  # noqa: F401 - lmkit_contract is a fixture
    OBJECTIVE_CHECKS,
    SAMPLER_CHECKS,
    Contract,
    ContractError,
    contract_cases,
    contract_tests,
    lmkit_contract,
)


@pytest.fixture(scope="module")
def lmkit_data(tiny_data):
    """Share the suite's tiny corpus instead of preparing the plugin's default one."""
    return tiny_data


# every check on every registered objective and sampler: minutes, so in the slow run
test_contract = pytest.mark.slow(contract_tests())


def test_every_registered_objective_and_sampler_is_covered():
    registry = get_registry()
    cases = contract_cases()
    objectives = {c[1] for c in cases if c[0] == "objective"}
    samplers = {c[1] for c in cases if c[0] == "sampler"}
    assert objectives == set(registry.entries["objective"]) >= {"ar", "mdlm", "maskrecon"}
    assert samplers == set(registry.entries["sampler"])
    assert len([c for c in cases if c[0] == "objective"]) == len(objectives) * len(OBJECTIVE_CHECKS)
    assert all(c[3] in SAMPLER_CHECKS for c in cases if c[0] == "sampler")


# -- the contract catches what it claims to catch --------------------------------------------------
def _windows(val: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = (val.numel() - 1) // seq
    return val[: n * seq].view(n, seq), val[1: n * seq + 1].view(n, seq)


class ConstantBytesPerToken(ARObjective):
    """The #1106 bug: bytes from a fixed bytes/token instead of the LUT."""

    name = "bad_bytes"

    def evaluate(self, model, ctx):
        inputs, targets = _windows(ctx.val_tokens, ctx.seq_len)
        nats = token_nats(model, inputs, targets).sum(1)
        meter = ctx.meter("nll", "upper_bound")
        n = targets.size(0)
        meter.add_estimate(nats, torch.zeros(n), torch.full((n,), round(4.3 * ctx.seq_len)),
                           torch.full((n,), ctx.seq_len))
        return [meter.metric()]


class UnseededMasks(ARObjective):
    """The #1106 bug: scores a random subset drawn from the global RNG."""

    name = "bad_seed"

    def evaluate(self, model, ctx):
        inputs, targets = _windows(ctx.val_tokens, ctx.seq_len)
        meter = ctx.meter("nll_subset", "exact")
        meter.add(token_nats(model, inputs, targets), targets, inputs,
                  torch.rand(targets.shape) < 0.5)
        return [meter.metric()]


class UnrequestedMask(ARObjective):
    """Uses id vocab_size as MASK without asking for it (the padded embedding hides the bug)."""

    name = "bad_ids"

    def loss(self, model, batch):
        tokens = batch.tokens.clone()
        tokens[:, 1::4] = self.tokens.vocab_size
        return super().loss(model, Batch(tokens, batch.step))


class BoundWithoutStderr(ARObjective):
    name = "bad_stderr"

    def evaluate(self, model, ctx):
        inputs, targets = _windows(ctx.val_tokens, ctx.seq_len)
        meter = ctx.meter("nelbo", "upper_bound")
        meter.add(token_nats(model, inputs, targets), targets, inputs)
        return [meter.metric()]


class FlatteringMetric(ARObjective):
    """Rescales what its meter measured."""

    name = "bad_rescale"

    def evaluate(self, model, ctx):
        return [dataclasses.replace(m, value=m.value / 1.77) for m in super().evaluate(model, ctx)]


class SpecialIdSampler:
    name = "bad_sampler"
    description = "emits the MASK id"
    objectives = ("mdlm",)

    def sample(self, model, ctx):
        tail = torch.full((ctx.num, ctx.length), ctx.tokens["MASK"])
        model(ctx.prompt.view(1, -1).expand(ctx.num, -1), torch.zeros(ctx.num))
        return SampleResult(tokens=torch.cat([ctx.prompt.expand(ctx.num, -1), tail], 1))


class GlobalRngSampler(SpecialIdSampler):
    name = "bad_rng_sampler"
    objectives = ("ar",)

    def sample(self, model, ctx):
        model(ctx.prompt.view(1, -1))
        tail = torch.randint(ctx.tokens.vocab_size, (ctx.num, ctx.length))
        return SampleResult(tokens=torch.cat([ctx.prompt.expand(ctx.num, -1), tail], 1))


@hookimpl
def register_objectives(register):
    for cls in (ConstantBytesPerToken, UnseededMasks, UnrequestedMask, BoundWithoutStderr,
                FlatteringMetric):
        register(cls)


@hookimpl
def register_samplers(register):
    register(SpecialIdSampler)
    register(GlobalRngSampler)


@pytest.fixture(scope="module")
def broken(tiny_data, tmp_path_factory):
    """A contract over a registry that also holds the broken plugin above."""
    reg = Registry()
    reg.load(entry_points=False)
    reg.add_plugin(sys.modules[__name__], "broken", "lmkit-broken", "0")
    registry_mod.reset_registry(reg)
    yield Contract(tiny_data, tmp_path_factory.mktemp("broken"))
    registry_mod.reset_registry(None)


@pytest.mark.parametrize("name, check, match", [
    ("bad_bytes", "bytes", "1 byte per token it reports 2760 bytes for 640 tokens"),
    ("bad_seed", "determinism", "depends on the global RNG"),
    ("bad_ids", "inputs", "fed id 1024"),
    ("bad_stderr", "metrics", "needs its standard error"),
    ("bad_rescale", "bytes", "differs from what its meter measured"),
])
def test_the_contract_catches_broken_objectives(broken, name, check, match):
    with pytest.raises(ContractError, match=f"objective '{name}' breaks the '{check}' contract.*"
                                            f"{match}"):
        broken.check_objective(name, check)
    broken.check_objective("ar", check)  # the same check passes on the real thing


@pytest.mark.parametrize("name, objective, check, match", [
    ("bad_sampler", "mdlm", "sample_shapes", "sampled id 1024"),
    ("bad_rng_sampler", "ar", "sample_determinism", "same seed gave different samples"),
])
def test_the_contract_catches_broken_samplers(broken, name, objective, check, match):
    with pytest.raises(ContractError, match=match):
        broken.check_sampler(name, objective, check)
