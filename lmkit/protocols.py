"""The stable surface plugin authors write against: objectives, samplers and what they receive.

An objective turns a batch of token windows into a training loss, and a validation stream into
per-token nats; core turns those nats into bits per byte with the exact byte LUT, so no objective
ever counts bytes itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from lmkit.core.bpb import BpbMeter, ByteLUT, Metric
    from lmkit.core.trunk import ModelConfig, Transformer


@dataclass(frozen=True)
class TokenSpec:
    """The token ids an objective works with.

    ``vocab_size`` ids come from the tokenizer and are the only ones the model predicts. Special
    ids an objective asks for through ``special_tokens`` (e.g. ``("MASK", "PAD")``) are numbered
    from ``vocab_size`` upwards in the order asked and get their own embedding rows.
    """

    vocab_size: int
    bos_id: int
    special: Mapping[str, int] = field(default_factory=dict)

    def __getitem__(self, name: str) -> int:
        return self.special[name]


@dataclass
class Batch:
    """One micro-batch of training data.

    ``tokens`` is int64 ``[B, T+1]``: B contiguous windows of the training stream, each one token
    longer than ``seq_len`` so that a causal objective reads ``tokens[:, :-1] -> tokens[:, 1:]``
    and a masked objective can use ``tokens[:, 1:]`` with ``tokens[:, :-1]`` as each target's
    predecessor. Documents start with ``bos_id``; windows cross document boundaries.
    """

    tokens: torch.Tensor
    step: int


@dataclass
class LossOutput:
    """What ``Objective.loss`` returns: the scalar to back-propagate and extra scalars to log."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalContext:
    """Everything an objective needs to score a model on validation data.

    ``val_tokens`` is the deterministic prefix of the validation stream (int64, on CPU, one token
    more than the number of targets). ``meter(name, kind, detail)`` returns a
    :class:`~lmkit.core.bpb.BpbMeter` that accumulates nats and exact LUT bytes of exactly the
    tokens you add; return ``meter.metric()`` values. ``purpose`` is ``"validation"`` during
    training (be quick) or ``"eval"`` for ``lmkit eval`` (be thorough). ``options`` are the
    objective's evaluation options (already validated against ``EvalOptions``).
    """

    val_tokens: torch.Tensor
    seq_len: int
    batch_size: int
    device: torch.device
    autocast: Callable[[], AbstractContextManager[Any]]
    lut: ByteLUT
    tokens: TokenSpec
    seed: int
    purpose: str
    options: Any
    progress: Callable[[int, int], None] = lambda done, total: None
    precision: str = "fp32"
    model_calls: Callable[[], int] = lambda: 0
    marks: list[tuple[str, float, int]] = field(default_factory=list)

    def meter(self, name: str, kind: str, detail: dict | None = None) -> BpbMeter:
        import time

        from lmkit.core.bpb import BpbMeter

        # Estimators run one after another, so a meter's cost runs from its creation to the
        # next one's (or the end): that is what `lmkit bench eval` reports.
        self.marks.append((name, time.perf_counter(), self.model_calls()))
        return BpbMeter(self.lut, name, kind, detail)


@runtime_checkable
class Objective(Protocol):
    """A training objective, registered as a class through ``register_objectives``.

    Class attributes: ``name``, ``description``, ``special_tokens`` (names of extra ids such as
    ``"MASK"``), ``Options`` (a dataclass of the ``[objective]`` config section) and
    ``EvalOptions`` (a dataclass of ``lmkit eval`` options). The host instantiates it as
    ``cls(options, tokens)``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    special_tokens: ClassVar[tuple[str, ...]]
    Options: ClassVar[type]
    EvalOptions: ClassVar[type]

    def configure_model(self, cfg: ModelConfig) -> ModelConfig:
        """Return the trunk config this objective needs (e.g. force bidirectional attention)."""
        ...

    def loss(self, model: Transformer, batch: Batch) -> LossOutput:
        """Training loss on one micro-batch (nats per scored token, or the objective's weights)."""
        ...

    def evaluate(self, model: Transformer, ctx: EvalContext) -> list[Metric]:
        """Score ``ctx.val_tokens``; every metric comes from a ``ctx.meter``."""
        ...


REQUIRED_OBJECTIVE_ATTRS = (
    "name", "description", "special_tokens", "Options", "EvalOptions",
    "configure_model", "loss", "evaluate",
)
