"""The one build path: a config (and its data, or a run's stored pieces) -> objective, model,
tokenizer, and everything derived from them — training loaders, evaluation contexts, call counts.

Training, evaluation, packing, sampling, benchmarks and the contract kit all build through
:func:`build`, so a model is constructed, seeded and given its byte LUT in exactly one place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from lmkit.core import config as config_mod
from lmkit.core.bpb import ByteLUT
from lmkit.core.config import RunConfig
from lmkit.core.data import DataSource, RotatingLoader
from lmkit.core.device import autocast, resolve_device, resolve_dtype
from lmkit.core.registry import get_objective
from lmkit.core.tokenizer import Tokenizer
from lmkit.core.trunk import ModelConfig, Transformer
from lmkit.errors import LmkitError
from lmkit.protocols import EvalContext, TokenSpec


def batch_geometry(cfg: RunConfig) -> tuple[int, int, int]:
    """(sequences per micro-batch, micro-batches per step, tokens per optimizer step)."""
    t = cfg.train
    seqs_per_step = max(1, t.batch_tokens // t.seq_len)
    micro = min(t.micro_batch or seqs_per_step, seqs_per_step)
    accum = math.ceil(seqs_per_step / micro)
    return micro, accum, accum * micro * t.seq_len


def token_spec(objective_cls: Any, tokenizer: Tokenizer) -> TokenSpec:
    """The tokenizer's ids plus the objective's special ids, numbered from ``vocab_size`` up."""
    specials = tuple(objective_cls.special_tokens)
    return TokenSpec(vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                     special={name: tokenizer.vocab_size + i for i, name in enumerate(specials)})


def new_model(model_cfg: ModelConfig, vocab_size: int, n_special: int = 0,
              device: torch.device | str = "cpu", context: int = 1024) -> Transformer:
    """The one place a trunk is constructed: ``vocab_size`` real ids plus ``n_special`` rows
    for an objective's special ids; RoPE tables for ``context`` positions to start with."""
    return Transformer(model_cfg, vocab_size, n_special, context).to(device)


def trunk_shapes(model_cfg: ModelConfig, vocab_size: int, n_special: int = 0
                 ) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the trunk's state dict, computed on the meta device:
    nothing is allocated, so a stored config can be checked against stored tensors first."""
    config_mod.check_model(model_cfg, vocab_size=vocab_size)
    with torch.device("meta"):
        model = Transformer(model_cfg, vocab_size, n_special, context=1)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def compare_shapes(stored: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]],
                   where: str) -> None:
    """Stored tensors must hold every trunk tensor with its shape; extra ones may only be an
    objective's own modules."""
    missing = sorted(set(want) - set(stored))
    extra = sorted(n for n in set(stored) - set(want) if not n.startswith("objective_modules."))
    if missing or extra:
        raise LmkitError(f"{where} does not match the model its config describes (missing "
                         f"{missing[:3]}, unexpected {extra[:3]}); it is damaged or from "
                         "another run")
    for name, shape in want.items():
        if stored[name] != shape:
            raise LmkitError(f"{where}: tensor {name} has shape {list(stored[name])}, the "
                             f"model config says {list(shape)}; it is damaged or from another run")


def attach_objective_modules(objective: Any, model: Transformer) -> None:
    """Build the objective's own trainable modules (``objective.modules(model_cfg)``, optional)
    into ``model.objective_modules`` on the model's device, so they are trained, counted,
    checkpointed and packed with the trunk; refuse modules it holds without declaring them."""
    declared = dict(objective.modules(model.cfg)) if hasattr(objective, "modules") else {}
    for name, module in declared.items():
        if not (isinstance(name, str) and name.isidentifier()) or not isinstance(module,
                                                                                torch.nn.Module):
            raise LmkitError(f"objective {objective.name!r}: modules() must map identifier "
                             f"names to torch.nn.Module, got {name!r}: {type(module).__name__}")
        model.objective_modules[name] = module
    model.to(next(model.parameters()).device)
    check_declared(objective, model)


def check_declared(objective: Any, model: Transformer) -> None:
    """An nn.Module or nn.Parameter the objective holds must be one it declared in ``modules``
    (else it would silently never be trained, saved, counted or packed)."""
    owned = {id(x) for m in model.objective_modules.values()
             for x in (*m.modules(), *m.parameters())}
    for attr, value in vars(objective).items():
        values = value.values() if isinstance(value, dict) else (
            value if isinstance(value, (list, tuple)) else [value])
        for v in values:
            if isinstance(v, (torch.nn.Module, torch.nn.Parameter)) and id(v) not in owned:
                raise LmkitError(
                    f"objective {objective.name!r} holds a trainable {type(v).__name__} in "
                    f"attribute {attr!r} that it did not declare: return it from "
                    "`modules(cfg)` so it is trained, saved, counted and packed with the model")


class CallCounter:
    """Counts forward passes of a model (every pass embeds its input exactly once), so no
    estimator or sampler can misreport its cost. A context manager: the hook goes on exit."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        inner = getattr(model, "_orig_mod", model)
        self._hook = inner.embed.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self._hook.remove()

    def __enter__(self) -> CallCounter:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


@dataclass
class Setup:
    """Everything built from one config; handed down instead of re-derived."""

    cfg: RunConfig
    device: torch.device
    precision: str  # "fp32" | "bf16": the autocast of training and (by default) evaluation
    tokenizer: Tokenizer
    tokens: TokenSpec
    objective: Any
    model: Transformer
    data: DataSource | None = None  # the shards, when this process has opened them

    @property
    def config(self) -> RunConfig:
        return self.cfg

    @property
    def autocast(self) -> Callable[[], Any]:
        return autocast(self.device, self.precision)

    @cached_property
    def lut(self) -> ByteLUT:
        """The exact byte LUT over the model's (padded) vocabulary, on the model's device."""
        return self.tokenizer.lut(self.model.padded_vocab).to(self.device)

    @property
    def micro_batch(self) -> int:
        return batch_geometry(self.cfg)[0]

    def require_data(self, why: str) -> DataSource:
        if self.data is None:
            raise LmkitError(f"{why} needs the training data, which this process has not "
                             "opened; pass --data DIR")
        return self.data

    def loader(self, batch_size: int | None = None, *, rank: int = 0,
               world_size: int = 1) -> RotatingLoader:
        """A training loader over the run's shards, seed and grouping (``batch_size``
        sequences per call; default: the micro-batch)."""
        data = self.require_data("a training loader")
        return RotatingLoader(
            data.train_shards, batch_size=batch_size or self.micro_batch,
            seq_len=self.cfg.train.seq_len, seed=self.cfg.train.seed,
            group_size=self.cfg.data.group_size, vocab_size=data.vocab_size,
            rank=rank, world_size=world_size,
        )

    def eval_context(
        self,
        val_tokens: torch.Tensor,
        *,
        purpose: str = "eval",
        options: dict[str, Any] | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        precision: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        lut: ByteLUT | None = None,
    ) -> EvalContext:
        """The one :class:`EvalContext` factory: validation, ``lmkit eval``, pack and the kit.

        ``options`` are the objective's evaluation options as loose values (``--opt``);
        ``batch_size`` defaults to the training micro-batch (what fit in memory there).
        """
        precision = resolve_dtype(precision or self.cfg.train.dtype, self.device)
        return EvalContext(
            val_tokens=val_tokens, seq_len=self.cfg.train.seq_len,
            batch_size=batch_size or self.micro_batch, device=self.device,
            autocast=autocast(self.device, precision), lut=lut or self.lut, tokens=self.tokens,
            seed=self.cfg.train.seed if seed is None else seed, purpose=purpose,
            options=config_mod.build_options(self.objective.EvalOptions, options or {}, "--opt"),
            progress=progress or (lambda done, total: None), precision=precision,
        )


def build(
    cfg: RunConfig,
    data: DataSource | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    tokens: TokenSpec | None = None,
    model_cfg: ModelConfig | None = None,
    device: torch.device | str | None = None,
) -> Setup:
    """Objective and seeded model for ``cfg``; validates (and normalises) the objective's options.

    Training passes ``data``; a stored run passes its own tokenizer, token ids and model config
    (what it was trained with) instead of deriving them again.
    """
    cls = get_objective(cfg.objective).obj
    if tokenizer is None:
        if data is None:
            raise ValueError("build needs data or a tokenizer")
        tokenizer = data.tokenizer
    tokens = tokens or token_spec(cls, tokenizer)
    options = config_mod.build_options(cls.Options, cfg.options, "options")
    cfg.options = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}
    objective = cls(options, tokens)
    model_cfg = model_cfg or objective.configure_model(dataclasses.replace(cfg.model))
    dev = resolve_device(str(device or cfg.train.device))
    torch.manual_seed(cfg.train.seed)
    model = new_model(model_cfg, tokens.vocab_size, len(tokens.special), dev, cfg.train.seq_len)
    attach_objective_modules(objective, model)
    return Setup(cfg, dev, resolve_dtype(cfg.train.dtype, dev), tokenizer, tokens, objective,
                 model, data)
