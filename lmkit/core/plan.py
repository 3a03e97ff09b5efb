"""Planning a training run: its resolved config and run directory, fresh or resumed."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkit.core import atomic, distributed, runs
from lmkit.core import config as config_mod
from lmkit.core.config import RunConfig
from lmkit.core.registry import get_objective
from lmkit.errors import LmkitError

# What a resumed run may change: its budget and bookkeeping, never what it learns.
RESUMABLE_TRAIN_KEYS = {"steps", "tokens", "time", "log_every", "val_every", "val_tokens",
                        "ckpt_every", "ckpt_seconds", "device", "compile"}


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
    get_objective(cfg.objective)  # unknown objective: fail before any work
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
