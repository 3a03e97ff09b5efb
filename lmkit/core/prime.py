"""Priming: untimed warm-up steps whose every effect is undone (``train.prime_steps``).

The first steps of a process pay for ``torch.compile``, kernel autotuning and the allocator
filling its pools. A wall-clock budget should not: like the parameter-golf baseline, lmkit runs
``prime_steps`` real training steps before the clock starts, then restores the weights, the
optimizer state, the loader position and the RNG to what they were, so the run trains exactly
what it would have trained without them (tested bitwise) and only the warm caches remain.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def prime(steps: int, run_step: Callable[[int], Any], model: torch.nn.Module,
          optimizers: list[torch.optim.Optimizer], loader: Any) -> float:
    """Run ``run_step(i)`` for i < ``steps``, then restore everything it changed; return the
    seconds it took (spent outside the training clock). ``loader`` needs ``state_dict`` and
    ``load_state_dict`` (the :class:`~lmkit.core.data.RotatingLoader`'s)."""
    if steps <= 0:
        return 0.0
    t0 = time.perf_counter()
    inner = getattr(model, "_orig_mod", model)
    weights = {k: v.detach().clone() for k, v in inner.state_dict().items()}
    opt_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    position = copy.deepcopy(loader.state_dict())
    rng = _rng_state()
    for i in range(steps):
        run_step(i)
    with torch.no_grad():
        inner.load_state_dict(weights)  # copies in place: a compiled graph keeps its tensors
    for opt, state in zip(optimizers, opt_states, strict=True):
        opt.load_state_dict(state)
        for p in (p for group in opt.param_groups for p in group["params"]):
            p.grad = None
    loader.load_state_dict(position)
    _set_rng_state(rng)
    return time.perf_counter() - t0
