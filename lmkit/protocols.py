"""The stable surface plugin authors write against: objectives, samplers, loggers and what they
receive.

An objective turns a batch of token windows into a training loss, and a validation stream into
per-token nats; core turns those nats into bits per byte with the exact byte LUT, so no objective
ever counts bytes itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
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
    predecessor. Documents start with ``bos_id``; windows cross document boundaries. ``step`` is
    the optimizer step the batch is for (0-based), for objectives whose loss follows a
    curriculum; the built-ins do not use it.
    """

    tokens: torch.Tensor
    step: int = 0


@dataclass
class LossOutput:
    """What ``Objective.loss`` returns: the scalar to back-propagate, extra scalars to log
    (``metrics``: averaged over the log window into ``metrics.jsonl``'s ``loss_metrics`` and
    shown on the progress line), and ``tokens``, the real tokens this micro-batch trained on
    when that is not every target of the batch (e.g. windows padded at document ends)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    tokens: int | None = None


@dataclass
class EvalContext:
    """Everything an objective needs to score a model on validation data.

    ``val_tokens`` is the deterministic prefix of the validation stream (int64, on CPU, one token
    more than the number of targets). ``meter(name, kind, detail)`` returns a
    :class:`~lmkit.core.bpb.BpbMeter`: give it the nats of the stream positions you scored
    (``meter.add_positions`` / ``meter.add_estimate_positions``) and it counts their exact LUT
    bytes; return ``meter.metric()`` values. ``purpose`` is ``"validation"`` during
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
        return BpbMeter(self.lut, name, kind, detail, stream=self.val_tokens)


@runtime_checkable
class Objective(Protocol):
    """A training objective, registered as a class through ``register_objectives``.

    Class attributes: ``name``, ``description``, ``special_tokens`` (names of extra ids such as
    ``"MASK"``), ``Options`` (a dataclass of the ``[objective]`` config section) and
    ``EvalOptions`` (a dataclass of ``lmkit eval`` options). The host instantiates it as
    ``cls(options, tokens)``. Optional: ``exact_next_token = True`` declares that the model's
    logits at position i are exactly p(token i+1 | tokens ≤ i), which lets its runs judge samples
    (the ``next_token`` capability); ``capabilities`` names what else samplers may rely on:
    ``"masked"`` means the instance exposes a :class:`~lmkit.core.masking.MaskedSpec` as
    ``spec`` (absorbing MASK process, SUBS model), which the masked samplers need.
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


@dataclass
class SampleContext:
    """What a sampler gets: the request, the run's objective and a seeded generator.

    ``prompt`` (int64 ``[P]``, BOS first) starts every sample and is never changed; ``length``
    tokens are generated after it. ``context`` is the longest sequence the run was trained on.
    ``steps`` is the number of denoising steps (samplers without steps ignore it). Every random
    draw must come from ``generator`` so that a seed fixes the output; draw in ``dtype``
    (float64 by default, see :mod:`lmkit.core.sampling`). ``options`` is the sampler's
    ``Options`` dataclass, filled from ``--opt key=value``. A masked objective exposes its
    :class:`~lmkit.core.masking.MaskedSpec` as ``objective.spec``.
    """

    objective: Any
    tokens: TokenSpec
    prompt: torch.Tensor
    num: int
    length: int
    steps: int
    context: int
    generator: torch.Generator
    device: torch.device
    autocast: Callable[[], AbstractContextManager[Any]]
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    options: Any = None
    dtype: Any = None  # torch dtype of every random draw; None = float64


@dataclass
class SampleResult:
    """What ``Sampler.sample`` returns.

    ``tokens``: int64 ``[num, P + length]``, the prompt then the generated ids, all real
    vocabulary ids (never MASK or PAD); the host checks this. ``detail``: anything worth
    reporting (e.g. steps taken). The host counts the model's forward passes (NFE) itself.
    """

    tokens: torch.Tensor
    detail: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Sampler(Protocol):
    """A way to generate text from a trained model, registered through ``register_samplers``.

    Class attributes: ``name``, ``description``, and what it serves: ``requires`` (capabilities
    an objective must declare, e.g. ``("masked",)``: any objective with them is served, built-in
    or not) or ``objectives`` (objective names, ``("*",)`` for any). Optional: ``Options`` (a
    dataclass of ``--opt`` settings), ``bench_variants`` (label -> options that change speed but
    not tokens, benchmarked and checked by ``lmkit bench sample``) and ``same_tokens_as`` (the
    name of a sampler it must equal token for token). The host instantiates it with no arguments
    and calls ``sample`` under ``torch.no_grad()`` with the model in eval mode.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def sample(self, model: Transformer, ctx: SampleContext) -> SampleResult:
        """Generate ``ctx.num`` sequences of ``ctx.length`` tokens after ``ctx.prompt``."""
        ...


@dataclass(frozen=True)
class LoggerContext:
    """What a logger is opened with, once per training run (resumed runs included).

    ``run_dir`` is the run directory (write files under it, e.g. ``RUN/tensorboard/``);
    ``config`` the resolved run config as stored in ``run.json`` (``objective``, ``preset``,
    ``model``, ``optim``, ``train``, ``data``, ``options``); ``resumed_at`` the step a resumed
    run continues from (None for a fresh run), so a tracker can continue its own run.
    """

    run_dir: Path
    config: dict[str, Any]
    resumed_at: int | None = None


@runtime_checkable
class Logger(Protocol):
    """A metric sink, registered as a class through ``register_loggers`` and selected with
    ``lmkit train --log NAME`` (config key ``train.log``).

    Class attributes: ``name``, ``description``. The host instantiates it as ``cls(ctx)`` with a
    :class:`LoggerContext` before the first step (raise :class:`~lmkit.errors.LmkitError` there
    when a library is missing, naming what to install), calls ``log(record)`` with every record
    ``metrics.jsonl`` receives, in order (a copy of the JSON object: ``type`` is ``"train"`` or
    ``"val"``, with ``step`` and ``tokens``), and ``close()`` once when training ends, however it
    ends. ``metrics.jsonl`` stays the authoritative log: a logger that raises is dropped for the
    rest of the run with one warning, and the run goes on.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def log(self, record: dict[str, Any]) -> None:
        """Receive one record, exactly as written to ``metrics.jsonl``."""
        ...

    def close(self) -> None:
        """Flush and release whatever the logger holds."""
        ...
