"""An exponential moving average (EMA) of the weights, kept in fp32 beside the model.

``train.ema = d`` (0 = off) keeps ``ema = lerp(ema, w, 1 - d_n)`` after every optimizer step n
(n = 0, 1, ...), with ``d_n = min(d, (1 + n) / (10 + n))``: the warm-up of TensorFlow's
``ExponentialMovingAverage(num_updates=n)``, so a short run's average is not dominated by its
random initial weights. The average is saved with every checkpoint (``ema.safetensors``) and
restored bit for bit on resume; validation during training, ``lmkit eval``, ``lmkit pack`` and
``lmkit sample`` use it in place of the raw weights (their results say ``"weights": "ema"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from lmkit.errors import LmkitError

EMA_WARMUP = 10  # d_n = min(d, (1 + n) / (EMA_WARMUP + n))


def ema_decay(decay: float, n: int) -> float:
    """The decay applied at update ``n`` (0-based) for a configured ``decay``."""
    return min(decay, (1 + n) / (EMA_WARMUP + n))


def _named(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    inner = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    return list(inner.named_parameters())


class WeightEMA:
    """The fp32 average of ``model``'s parameters (tied ones once), starting at their values."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise LmkitError(f"train.ema={decay!r}: an EMA decay must be in (0, 1)")
        self.decay = decay
        named = _named(model)
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self, n: int) -> None:
        """Fold in the current weights after optimizer step ``n`` (0-based)."""
        weight = 1.0 - ema_decay(self.decay, n)
        current = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average by parameter name, on the CPU (what ``ema.safetensors`` holds)."""
        return {name: t.detach().cpu().contiguous() for name, t in zip(self.names, self.shadow,
                                                                        strict=True)}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Restore a saved average exactly; one that does not match the model is an error."""
        check_ema_tensors(tensors, dict(zip(self.names, self.params, strict=True)), where)
        for name, shadow in zip(self.names, self.shadow, strict=True):
            shadow.copy_(tensors[name])

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block, its own weights (bitwise) after it."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, shadow in zip(self.params, self.shadow, strict=True):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, saved, strict=True):
                    p.copy_(value)


def ema_weights(ema: WeightEMA | None) -> AbstractContextManager[None]:
    """:meth:`WeightEMA.swapped_in`, or nothing when the run keeps no EMA."""
    return nullcontext() if ema is None else ema.swapped_in()


def check_ema_tensors(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                      where: str) -> None:
    """Names, shapes, dtype (fp32) and finiteness of a saved average against the parameters."""
    missing = [k for k in params if k not in tensors]
    unexpected = [k for k in tensors if k not in params]
    if missing or unexpected:
        raise LmkitError(f"{where} does not match the run's model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); restore the checkpoint or train again")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(params[name].shape) or value.dtype != torch.float32:
            raise LmkitError(f"{where}: {name} is {value.dtype} {tuple(value.shape)}, the "
                             f"average of a parameter of shape {tuple(params[name].shape)} must "
                             "be float32 of that shape; the checkpoint is damaged")
        if not bool(torch.isfinite(value).all()):
            raise LmkitError(f"{where}: {name} holds NaN or infinite values; the checkpoint is "
                             "damaged")


@torch.no_grad()
def load_ema_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Replace ``model``'s parameters by a saved average (for eval, pack and sample)."""
    named = dict(_named(model))
    check_ema_tensors(tensors, named, where)
    for name, p in named.items():
        p.copy_(tensors[name])
