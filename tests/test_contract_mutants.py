"""The contract kit catches wrong numbers, not just the wrong shape of them.

Each objective below is a realistic bug, written as a third-party plugin against the public API
with the meter methods today's plugins use (``meter.add`` / ``meter.add_estimate`` with
``ctx.lut``). Every one must fail ``objective_contract`` with a message naming the metric and
the problem; ``ar`` passes the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmkit import LossOutput
from lmkit.testing import ContractError, objective_contract
from tests.conftest import registered_plugin

pytestmark = pytest.mark.slow  # each mutant runs the whole contract: the slow run has them


@dataclass
class NoOptions:
    pass


class Causal:
    """A plain next-token objective; subclasses break one thing in ``evaluate``."""

    name = "causal"
    description = "test: next-token prediction"
    special_tokens: tuple[str, ...] = ()
    Options = NoOptions
    EvalOptions = NoOptions

    def __init__(self, options, tokens):
        self.tokens = tokens

    def configure_model(self, cfg):
        cfg.causal, cfg.time_cond = True, False
        return cfg

    def loss(self, model, batch):
        x = batch.tokens
        return LossOutput(F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()))

    def windows(self, ctx):
        """(inputs, targets, predecessors of the targets, two back) per batch of windows."""
        val, seq = ctx.val_tokens, ctx.seq_len
        n = (val.numel() - 1) // seq
        padded = torch.cat([torch.tensor([-1]), val])
        for b in range(0, n, ctx.batch_size):
            starts = torch.arange(b, min(b + ctx.batch_size, n)).unsqueeze(1) * seq
            offs = torch.arange(seq)
            yield (val[starts + offs], val[starts + offs + 1], val[starts + offs],
                   padded[starts + offs])

    def nats(self, model, inputs, targets):
        logits = model(inputs)
        return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")

    def evaluate(self, model, ctx):
        meter = ctx.meter("nll", "exact", {"estimator": "exact NLL"})
        for inputs, targets, prev, prev2 in self.windows(ctx):
            meter.add(self.nats(model, inputs, targets), targets, prev, prev2=prev2)
        return [meter.metric()]


class PredecessorBytes(Causal):
    name = "m_predecessor"

    def evaluate(self, model, ctx):  # bytes of each target's predecessor: off by one token
        meter = ctx.meter("nll", "exact", {"estimator": "exact NLL"})
        for inputs, targets, prev, prev2 in self.windows(ctx):
            back3 = torch.cat([torch.full_like(prev2[:, :1], -1), prev2[:, :-1]], dim=1)
            meter.add(self.nats(model, inputs, targets), prev, prev2.clamp(min=0), prev2=back3)
        return [meter.metric()]


class NoisedInputBytes(Causal):
    name = "m_noised"
    special_tokens = ("MASK",)

    def configure_model(self, cfg):
        cfg.causal, cfg.time_cond = False, False
        return cfg

    def loss(self, model, batch):
        x0 = batch.tokens[:, 1:]
        masked = torch.rand(x0.shape) < 0.5
        xt = torch.where(masked, self.tokens["MASK"], x0)
        ce = F.cross_entropy(model(xt).float().transpose(1, 2), x0, reduction="none")
        return LossOutput((ce * masked).sum() / masked.sum().clamp(min=1))

    def evaluate(self, model, ctx):  # bytes counted on x_t, where MASK is 0 bytes
        gen = torch.Generator().manual_seed(ctx.seed)
        meter = ctx.meter("recon_bound", "upper_bound", {"estimator": "2 x masked CE"})
        for _, x0, prev, prev2 in self.windows(ctx):
            draws = []
            for _ in range(4):
                masked = torch.rand(x0.shape, generator=gen) < 0.5
                xt = torch.where(masked, self.tokens["MASK"], x0)
                ce = F.cross_entropy(model(xt).float().transpose(1, 2), x0, reduction="none")
                draws.append(2 * (ce * masked).sum(dim=1).double())
            est = torch.stack(draws, 1)
            meter.add_estimate(est.mean(1), est.var(1) / 4,
                               ctx.lut.target_bytes(xt, prev, prev2).sum(1),
                               torch.full((x0.size(0),), x0.size(1)))
        return [meter.metric()]


class MonteCarloAsExact(Causal):
    name = "m_mc_exact"

    def evaluate(self, model, ctx):  # a Monte-Carlo figure fed through meter.add as 'exact'
        gen = torch.Generator().manual_seed(ctx.seed)
        meter = ctx.meter("nll", "exact", {"estimator": "exact NLL (it says)"})
        for inputs, targets, prev, prev2 in self.windows(ctx):
            noise = 1 + 0.05 * (torch.rand(targets.shape, generator=gen) - 0.5)
            meter.add(self.nats(model, inputs, targets) * noise, targets, prev, prev2=prev2)
        return [meter.metric()]


class FirstBlockOnly(Causal):
    name = "m_first_block"

    def evaluate(self, model, ctx):  # an "exact" chain rule that scores only the first block
        meter = ctx.meter("chain_rule", "exact", {"estimator": "chain rule (first block)"})
        for inputs, targets, prev, prev2 in self.windows(ctx):
            nats = self.nats(model, inputs, targets)
            nats[:, 8:] = 0.0
            meter.add(nats, targets, prev, prev2=prev2)
        return [meter.metric()]


class SkippedLastBlock(Causal):
    name = "m_short_bound"

    def evaluate(self, model, ctx):  # an "upper bound" that leaves out its last block's nats
        exact = super().evaluate(model, ctx)
        meter = ctx.meter("nelbo", "upper_bound", {"estimator": "bound (skips a block)"})
        for inputs, targets, prev, prev2 in self.windows(ctx):
            per_row = self.nats(model, inputs, targets)[:, :-8].sum(1).double()
            meter.add_estimate(per_row, torch.full_like(per_row, 1e-4),
                               ctx.lut.target_bytes(targets, prev, prev2).sum(1),
                               torch.full((targets.size(0),), targets.size(1)))
        return exact + [meter.metric()]


class NaNNats(Causal):
    name = "m_nan"

    def evaluate(self, model, ctx):
        meter = ctx.meter("nll", "exact", {"estimator": "exact NLL"})
        for inputs, targets, prev, prev2 in self.windows(ctx):
            nats = self.nats(model, inputs, targets)
            meter.add(nats * float("nan"), targets, prev, prev2=prev2)
        return [meter.metric()]


class UnrequestedSpecialId(Causal):
    name = "m_special"  # asks for no special ids, then feeds one past the vocabulary

    def loss(self, model, batch):
        x = batch.tokens[:, :-1].clone()
        x[:, ::4] = self.tokens.vocab_size + 1
        return LossOutput(F.cross_entropy(model(x).flatten(0, 1), batch.tokens[:, 1:].flatten()))


class UndeclaredHead(Causal):
    name = "m_undeclared"

    def __init__(self, options, tokens):
        super().__init__(options, tokens)
        self.head2 = nn.Linear(8, 8)  # never declared through modules(): never trained or saved


MUTANTS = [
    (PredecessorBytes, "bytes", "metric 'nll'.*not the bytes of the targets it scored"),
    (NoisedInputBytes, "bytes", "metric 'recon_bound'.*not the bytes of the targets it scored"),
    (MonteCarloAsExact, "seeds", "exact metric 'nll' changes with the evaluation seed"),
    (FirstBlockOnly, "bytes", "exact metric 'chain_rule'.*nats do not cover all of them"),
    (SkippedLastBlock, "bound_order", "upper bound 'nelbo'.*sits below the exact code length"),
    (NaNNats, "metrics", "metric 'nll'.*is not finite"),
    (UnrequestedSpecialId, "loss", "'m_special': the model was fed id 1025"),
    (UndeclaredHead, "protocol", "attribute 'head2' that it did not declare"),
]


@pytest.fixture(scope="module")
def mutants():
    with registered_plugin("mutants", objectives=[Causal, *(m[0] for m in MUTANTS)]):
        yield


@pytest.mark.parametrize("cls, check, message", MUTANTS, ids=[m[0].name for m in MUTANTS])
def test_each_mutant_fails_the_contract_naming_the_problem(mutants, tiny_data, tmp_path, cls,
                                                           check, message):
    with pytest.raises(ContractError, match=message) as err:
        objective_contract(cls.name, tiny_data, tmp_path)
    assert f"objective {cls.name!r}" in str(err.value)
    assert f"'{check}' contract" in str(err.value) or check == "protocol", str(err.value)


def test_the_honest_twin_passes(mutants, tiny_data, tmp_path):
    assert "bytes" in objective_contract("causal", tiny_data, tmp_path)
