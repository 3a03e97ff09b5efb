"""Planning a training run: its resolved config and run directory, fresh or resumed, and its
budget with the learning-rate schedule that spends it.

With a time budget (``--time``, the parameter-golf rule) the schedule is a function of the
elapsed fraction of the cap: the warmdown ends at the cap. The fraction a step is scheduled at is
where that step is predicted to *end* (training seconds so far plus the recent mean step time,
:class:`Pace`; :func:`scheduled_end`), so the step predicted to reach the cap runs at the floor
and is the last one.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkit.core import atomic, distributed, runs
from lmkit.core import config as config_mod
from lmkit.core.config import RunConfig
from lmkit.core.loggers import check_loggers
from lmkit.core.registry import get_objective
from lmkit.errors import LmkitError

# What a resumed run may change: its budget and bookkeeping, never what it learns.
RESUMABLE_TRAIN_KEYS = {"steps", "tokens", "time", "log_every", "val_every", "val_tokens",
                        "ckpt_every", "ckpt_seconds", "device", "compile", "log", "prime_steps"}
PACE_WINDOW = 16  # steps whose mean duration predicts the next one


@dataclass
class Budget:
    steps: int
    tokens: int
    seconds: float

    def progress(self, step: int, tokens: int, seconds: float) -> float:
        """Fraction of the budget used: the largest of the budgets that are set."""
        parts = [step / self.steps if self.steps else 0.0,
                 tokens / self.tokens if self.tokens else 0.0,
                 seconds / self.seconds if self.seconds else 0.0]
        return max(parts)


def lr_multiplier(step: int, progress: float, warmup_steps: int, warmdown_frac: float) -> float:
    """Linear warmup over steps, constant, then linear decay to 0 over the last fraction."""
    mult = 1.0
    if warmup_steps and step < warmup_steps:
        mult = (step + 1) / warmup_steps
    if warmdown_frac > 0 and progress > 1 - warmdown_frac:
        mult = min(mult, max(0.0, (1 - progress) / warmdown_frac))
    return mult


class Pace:
    """The mean duration of the last ``PACE_WINDOW`` steps: how far the next step will move the
    clock. A window (not the whole run's mean) follows a machine that speeds up or slows down."""

    def __init__(self, window: int = PACE_WINDOW) -> None:
        self._recent: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self._recent.append(seconds)

    def estimate(self) -> float:
        """Predicted seconds of the next step (0 before the first one: nothing is known)."""
        return sum(self._recent) / len(self._recent) if self._recent else 0.0


def scheduled_end(budget: Budget, seconds: float, pace: Pace) -> float:
    """The training clock a step is scheduled to end at: ``seconds`` so far plus the predicted
    step. A step predicted to end within half a step of the time cap is scheduled at the cap, so
    it runs at the floor and is the last: the next one would end further past the cap than this
    one ends before it. Stopping is thus within about half a step of the cap."""
    step = pace.estimate()
    end = seconds + step
    if budget.seconds and end + step / 2 >= budget.seconds:
        return max(end, budget.seconds)
    return end


def budget_done(budget: Budget, state: dict[str, Any]) -> bool:
    """Whether a checkpoint's loop state has spent ``budget``: the time part counts the clock the
    last step was scheduled at (``clock_seconds``; older checkpoints: their seconds), which is
    how the loop itself stops."""
    clock = float(state.get("clock_seconds", state["seconds"]))
    return budget.progress(int(state["step"]), int(state["tokens"]), clock) >= 1.0


@dataclass
class TrainPlan:
    """What ``lmkit train`` will do: ``resume`` from the checkpoint, or ``restart`` a run that
    stopped before its first checkpoint from step 0 with its stored config (its log reset)."""

    cfg: RunConfig
    run_dir: Path
    resume: bool
    restart: bool = False


def plan_training(
    *,
    config_file: Path | None,
    preset: str | None,
    flags: dict[str, Any],
    sets: tuple[str, ...] | list[str],
    out: Path | None,
    resume: str | None,
) -> TrainPlan:
    """Resolve the config and run directory; a resumed run starts from its stored config."""
    resuming = restarting = False
    run_dir = out
    if resume:
        run_dir = out if resume == "auto" else Path(resume)
        if run_dir is None:
            raise LmkitError("--resume auto needs --out RUN_DIR (the run to continue)")
        resuming = runs.has_checkpoint(run_dir)
        restarting = not resuming and runs.has_run_files(run_dir)
        if resume != "auto" and not (resuming or restarting):
            raise LmkitError(
                f"--resume {resume}: {run_dir} holds no run (no checkpoint, no "
                f"{runs.CONFIG_FILE}); start one there with `lmkit train --out {run_dir}`")
        if restarting:
            warnings.warn(f"lmkit: {run_dir} stopped before its first checkpoint; restarting it "
                          f"from step 0 with its stored config", atomic.RecoveryWarning,
                          stacklevel=2)
    stored = run_dir / runs.CONFIG_FILE if (resuming or restarting) and run_dir else None
    cfg = config_mod.resolve_config(
        config_file=config_file or stored, preset=preset, flags=flags, sets=sets
    )
    get_objective(cfg.objective)  # unknown objective or logger: fail before any work
    check_loggers(cfg.train.log)
    if stored is not None and config_file is None:
        _check_resumable(config_mod.resolve_config(config_file=stored), cfg, run_dir)
    if run_dir is None:
        # under torchrun every rank trains into rank 0's directory (named by its clock)
        run_dir = distributed.broadcast_object(runs.default_run_dir(cfg.objective, cfg.preset))
    return TrainPlan(cfg, Path(run_dir), resuming, restarting)


def _check_resumable(stored: RunConfig, new: RunConfig, run_dir: Path) -> None:
    a, b = config_mod.to_dict(stored), config_mod.to_dict(new)
    for section, values in a.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if section == "train" and key in RESUMABLE_TRAIN_KEYS:
                    continue
                if b[section].get(key) != value:
                    raise LmkitError(
                        f"cannot resume {run_dir} with {section}.{key}={b[section].get(key)!r} "
                        f"(the run was trained with {value!r}); only the budget and logging "
                        f"options may change on resume"
                    )
        elif b[section] != values:
            raise LmkitError(f"cannot resume {run_dir} as {section}={b[section]!r} "
                             f"(the run is {values!r})")
