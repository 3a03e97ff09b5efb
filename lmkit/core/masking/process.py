"""The absorbing (MASK) forward process, its log-linear schedule and what a masked objective's
rows are made of."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmkit.core.trunk import head_nats
from lmkit.errors import LmkitError

ESTIMATORS = ("any_order", "time")
CHAIN_ORDERS = ("strided", "left_to_right")


@dataclass(frozen=True)
class LogLinearSchedule:
    """``α(t) = 1 − (1−ε)t``: the MDLM schedule; its ELBO weight is exactly ``1/t``."""

    eps: float = 1e-3

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - (1 - self.eps) * t

    def mask_prob(self, t: Tensor) -> Tensor:
        return (1 - self.eps) * t

    def sigma(self, t: Tensor) -> Tensor:
        """Total noise ``−log α(t)``: what MDLM-style models are conditioned on."""
        return -torch.log(self.alpha(t))

    def weight(self, t: Tensor) -> Tensor:
        """``−α'(t) / (1 − α(t))``, computed from the schedule (equals 1/t)."""
        return (1 - self.eps) / self.mask_prob(t)

    def prior_nats_per_token(self, vocab_size: int) -> float:
        """KL(q(x₁|x₀) ‖ (1−α₁)·MASK + α₁·Uniform(V)) per token = α(1)·ln V."""
        return self.eps * math.log(vocab_size)


@dataclass(frozen=True)
class MaskedSpec:
    """What an objective tells the shared machinery about its tokens and its model's input."""

    mask_id: int
    vocab_size: int
    bos_id: int
    pad_id: int | None = None
    schedule: LogLinearSchedule = LogLinearSchedule()
    time_input: str | None = "sigma"  # what the model is conditioned on: "sigma", "t" or None
    anchor_bos: bool = False           # BOS is never masked (a given document anchor)
    documents: bool = False            # rows never cross a document start (PAD fills the rest)

    def cond(self, t: Tensor) -> Tensor | None:
        if self.time_input is None:
            return None
        return self.schedule.sigma(t) if self.time_input == "sigma" else t


def free_information(spec: MaskedSpec) -> list[str]:
    """What a masked model is given that the AR ``nll`` protocol makes its model pay for.

    ``bos_anchor``: BOS tokens are never masked: they are context, not scored (AR scores them).
    ``document_boundaries``: rows stop at the next document's start and PAD fills the rest, so the
    model is told where every document starts and how long it is. Empty: the masked metrics score
    exactly the AR ``nll`` targets with nothing extra given.
    """
    return [name for name, on in (("bos_anchor", spec.anchor_bos),
                                  ("document_boundaries", spec.documents)) if on]


def stratified_times(n: int, t_min: float, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Tensor:
    """n times covering [t_min, 1] in equal strata with one shared uniform offset.

    Antithetic/stratified sampling for *training*: the batch always spans the whole schedule,
    which removes most of the variance a batch of i.i.d. times would add to the loss.
    """
    u = torch.rand((), generator=generator, device=device)
    k = torch.arange(n, device=device, dtype=torch.float32)
    return t_min + (1 - t_min) * (k + u) / n


def mask_tokens(x0: Tensor, mask_prob: Tensor, maskable: Tensor, mask_id: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Absorbing forward process: returns (x_t, masked); ``mask_prob`` is one value per row."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = (u < mask_prob.unsqueeze(-1)) & maskable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def document_segments(x0: Tensor, spec: MaskedSpec) -> Tensor | None:
    """The document of each position of a packed row (None outside document mode).

    Document mode packs a window's documents into one row, each attending only to itself
    (``Transformer.forward_hidden(segments=...)``): no token sees another document and no slot
    is padding. A BOS starts a new segment.
    """
    if not spec.documents:
        return None
    return torch.cumsum((x0 == spec.bos_id).int(), dim=1)


def padding_share(x0: Tensor, spec: MaskedSpec) -> float:
    """The share of row slots PAD would fill if rows stopped at the next document's start
    instead of packing documents (what document mode cost before packing; for benchmarks)."""
    is_bos = x0 == spec.bos_id
    is_bos[:, 0] = False
    return float((torch.cumsum(is_bos.int(), dim=1) > 0).float().mean())


def masked_spec(tokens: Any, eps: float, time_input: str | None, anchor_bos: bool,
                documents: bool) -> MaskedSpec:
    """The spec of an objective whose special tokens include ``MASK`` and ``PAD``."""
    if not 0 < eps < 1:
        raise LmkitError(f"options.eps must be in (0, 1), got {eps}")
    return MaskedSpec(
        mask_id=tokens["MASK"], vocab_size=tokens.vocab_size, bos_id=tokens.bos_id,
        pad_id=tokens["PAD"], schedule=LogLinearSchedule(eps), time_input=time_input,
        anchor_bos=anchor_bos, documents=documents,
    )


def training_rows(batch: Any, spec: MaskedSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, maskable positions) from a batch of stream windows. In document mode the row is
    packed (see :func:`document_segments`): every position is a real token."""
    x0 = batch.tokens[:, 1:]
    maskable = x0 != spec.bos_id if spec.anchor_bos else torch.ones_like(x0, dtype=torch.bool)
    return x0, maskable


def masked_nats(model: torch.nn.Module, xt: Tensor, x0: Tensor, masked: Tensor,
                cond: Tensor | None, segments: Tensor | None = None) -> Tensor:
    """−log p(x₀ | x_t) at masked positions (0 elsewhere), float32, shape of x0.

    Only masked positions go through the output head: at t≈0.5 that halves its cost.
    ``segments``: attention stays within each segment (packed documents).
    """
    hidden = (model.forward_hidden(xt, cond) if segments is None
              else model.forward_hidden(xt, cond, segments=segments))
    out = torch.zeros(x0.shape, device=x0.device, dtype=torch.float32)
    if masked.any():
        out[masked] = head_nats(model, hidden[masked], x0[masked])
    return out
