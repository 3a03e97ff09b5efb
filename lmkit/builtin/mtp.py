"""Multi-token prediction: the AR objective plus a head of its own that predicts token t+2.

The extra head is an objective-owned module (declared through ``modules``), so it is trained by
the run's optimizers, counted in ``params``, checkpointed, resumed and packed with the trunk.
Only the next-token head defines the model's distribution, so evaluation is the AR protocol's
exact NLL of that head; the t+2 head only shapes training (its loss is logged as
``nll_t2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.builtin.ar import AREvalOptions, ARObjective
from lmkit.core.trunk import ModelConfig, Transformer, head_nats
from lmkit.errors import LmkitError
from lmkit.protocols import Batch, LossOutput, TokenSpec


@dataclass
class MTPOptions:
    weight: float = 0.5  # weight of the t+2 cross-entropy in the loss


class MTPObjective(ARObjective):
    name = "mtp"
    description = "AR plus an own head predicting token t+2 (multi-token prediction); exact NLL"
    Options = MTPOptions
    EvalOptions = AREvalOptions

    def __init__(self, options: MTPOptions, tokens: TokenSpec):
        if not options.weight >= 0:
            raise LmkitError(f"options.weight must be >= 0, got {options.weight}")
        super().__init__(options, tokens)

    def modules(self, cfg: ModelConfig) -> dict[str, nn.Module]:
        """The t+2 head: hidden state at position i -> logits of token i+2."""
        self.head2 = nn.Linear(cfg.d_model, self.tokens.vocab_size, bias=False)
        nn.init.normal_(self.head2.weight, std=cfg.d_model ** -0.5)
        return {"head2": self.head2}

    def loss(self, model: Transformer, batch: Batch) -> LossOutput:
        inputs, targets = batch.tokens[:, :-1], batch.tokens[:, 1:]
        hidden = model.forward_hidden(inputs)
        next_nll = head_nats(model, hidden, targets).mean()
        ahead = self.head2(hidden[:, :-1]).float()
        t2_nll = F.cross_entropy(ahead.flatten(0, 1), targets[:, 1:].flatten())
        loss = next_nll + self.options.weight * t2_nll
        with torch.no_grad():
            logged = {"nll_next": float(next_nll), "nll_t2": float(t2_nll)}
        return LossOutput(loss, metrics=logged)
