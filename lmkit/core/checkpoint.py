"""Checkpoints: tensors in safetensors (no pickle), everything else in JSON, crash-safe.

A checkpoint is a directory ``checkpoint/`` holding ``model.safetensors``, ``optim.safetensors``
(optimizer tensors and RNG states), ``ema.safetensors`` when the run keeps an EMA of its weights
(:mod:`lmkit.core.ema`) and ``state.json`` (step, tokens, loader position, optimizer
param groups, and the sizes of the two tensor files). A save writes a complete copy into
``.checkpoint.tmp/`` (each file fsynced, ``state.json`` last: its presence, with matching file
sizes, is what makes a copy *complete*), then swaps it in with two renames::

    checkpoint/ -> .checkpoint.old/      .checkpoint.tmp/ -> checkpoint/      rm .checkpoint.old/

A crash at any instant leaves at least one complete copy among those three names. Readers
(:func:`read_state`, :func:`load_model_weights`: eval, sample, pack) take the newest complete
one without changing anything; the trainer, which holds the run's lock, promotes it back to
``checkpoint/`` (:func:`recover_checkpoint`) before it loads or saves.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from lmkit.core import atomic, jsonfile
from lmkit.errors import LmkitError

CHECKPOINT_DIR = "checkpoint"
TMP_DIR = f".{CHECKPOINT_DIR}.tmp"
OLD_DIR = f".{CHECKPOINT_DIR}.old"
BAD_DIR = f".{CHECKPOINT_DIR}.bad"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.safetensors"
EMA_FILE = "ema.safetensors"
FORMAT = "lmkit-checkpoint/1"
STATE_KEYS = ("step", "tokens", "seconds", "loader", "optimizers")
OPTIONAL_SECONDS = ("val_seconds", "clock_seconds")


def _flatten_optimizer(i: int, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt{i}.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(
    i: int, tensors: dict[str, torch.Tensor], meta: dict
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"opt{i}."
    for name, value in tensors.items():
        if name.startswith(prefix):
            pid, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# -- finding the newest complete copy ------------------------------------------------------------
def complete_state(ckpt: Path) -> dict[str, Any] | None:
    """The state of ``ckpt`` if it is a complete checkpoint, else None (never raises)."""
    try:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None
    sizes = state.get("files") or {MODEL_FILE: None, OPTIM_FILE: None}  # older: no sizes
    for name, size in sizes.items():
        try:
            actual = (ckpt / name).stat().st_size
        except OSError:
            return None
        if size is not None and actual != size:
            return None
    return state


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint copy of ``run_dir`` (read-only; see the module doc).

    Falls back to an incomplete ``checkpoint/`` so that its reader reports what is wrong with
    it; None when there is nothing at all.
    """
    run_dir = Path(run_dir)
    found = []
    for rank, name in enumerate((CHECKPOINT_DIR, TMP_DIR, OLD_DIR)):
        state = complete_state(run_dir / name)
        if state is not None:
            found.append((int(state.get("step", 0)), -rank, name))
    if found:
        return run_dir / max(found)[2]
    final = run_dir / CHECKPOINT_DIR
    return final if final.exists() else None


def recover_checkpoint(run_dir: Path) -> Path | None:
    """Promote the newest complete copy to ``checkpoint/`` (for the trainer, under its lock)."""
    run_dir = Path(run_dir)
    chosen = find_checkpoint(run_dir)
    if chosen is None or chosen.name == CHECKPOINT_DIR:
        return chosen
    final, old = run_dir / CHECKPOINT_DIR, run_dir / OLD_DIR
    if final.exists():  # older than ``chosen``, or incomplete: keep it aside, never delete it
        aside = run_dir / BAD_DIR if chosen == old else old
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(chosen, final)
    atomic.fsync_dir(run_dir)
    step = (complete_state(final) or {}).get("step")
    warnings.warn(f"lmkit: {run_dir}: a checkpoint save was interrupted; recovered the checkpoint "
                  f"of step {step} from {chosen.name}", atomic.RecoveryWarning, stacklevel=2)
    return final


# -- saving --------------------------------------------------------------------------------------
def _check_finite(weights: dict[str, torch.Tensor]) -> None:
    for name, value in weights.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise LmkitError(f"refusing to checkpoint non-finite weights ({name}); the previous "
                             f"checkpoint is kept")


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    state: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write model, optimizer and loop state (and ``ema``, the weights' average, when the run
    keeps one); return the checkpoint directory.

    A full disk raises one :class:`~lmkit.core.atomic.DiskFullError` and leaves the previous
    checkpoint as it was (the temporary copy is removed).
    """
    run_dir = Path(run_dir)
    recover_checkpoint(run_dir)  # the swap below must never drop the only complete copy
    final, tmp, old = run_dir / CHECKPOINT_DIR, run_dir / TMP_DIR, run_dir / OLD_DIR
    weights = {k: v.detach().cpu().contiguous() for k, v in _model_state(model).items()}
    _check_finite(weights)
    opt_tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        opt_tensors["rng.cuda"] = torch.cuda.get_rng_state()
    opt_meta = []
    for i, opt in enumerate(optimizers):
        tensors, meta = _flatten_optimizer(i, opt)
        opt_tensors.update(tensors)
        opt_meta.append(meta)
    blobs = {MODEL_FILE: serialize(weights, metadata={"format": FORMAT}),
             OPTIM_FILE: serialize(opt_tensors, metadata={"format": FORMAT})}
    if ema is not None:
        _check_finite(ema)
        blobs[EMA_FILE] = serialize(ema, metadata={"format": FORMAT})
    payload = {"format": FORMAT, **state, "optimizers": opt_meta,
               "files": {name: len(blob) for name, blob in blobs.items()}}
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, blob in blobs.items():
            atomic.write_bytes(tmp / name, blob, durable=True)
        atomic.write_json(tmp / STATE_FILE, payload, durable=True)  # last: marks it complete
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, atomic.DiskFullError) or atomic.is_disk_full(exc):
            kept = "; the previous checkpoint is intact" if final.exists() else ""
            raise atomic.disk_full_error(
                final, sum(len(b) for b in blobs.values()), note=kept) from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    atomic.fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # torch.compile wraps the module; store the plain names so checkpoints stay portable.
    inner = getattr(model, "_orig_mod", model)
    return inner.state_dict()


# -- loading -------------------------------------------------------------------------------------
def _resolve(run_dir: Path, ckpt: Path | None) -> Path:
    if ckpt is not None:
        return ckpt
    found = find_checkpoint(run_dir)
    if found is None:
        path = Path(run_dir) / CHECKPOINT_DIR
        raise LmkitError(f"{Path(run_dir)} has no checkpoint ({path} is missing); train the run "
                         f"(or continue it with `lmkit train --resume {run_dir}`) first")
    return found


def read_state(run_dir: Path, ckpt: Path | None = None) -> dict[str, Any]:
    """The loop state of the run's newest complete checkpoint (or of ``ckpt``)."""
    ckpt = _resolve(run_dir, ckpt)
    path = ckpt / STATE_FILE
    state = jsonfile.read_json(path, f"{Path(run_dir)} has no checkpoint ({path} is missing)")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else None
        raise LmkitError(f"{path}: unknown checkpoint format {fmt!r}")
    lacking = [k for k in STATE_KEYS if k not in state]
    if lacking:
        raise LmkitError(f"{path} is incomplete (no {', '.join(lacking)}); restore the checkpoint "
                         f"or train the run again")
    for key in OPTIONAL_SECONDS:  # newer clocks; absent in older checkpoints
        value = state.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise LmkitError(f"{path}: {key} is {value!r}, not a number of seconds; it is "
                             "damaged: restore the checkpoint or train the run again")
    return state


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise LmkitError(f"{path} is missing; the checkpoint is incomplete") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LmkitError(f"{path} is corrupt or truncated ({reason}); restore it or train the "
                         f"run again") from None


def load_model_weights(run_dir: Path, model: torch.nn.Module, ckpt: Path | None = None) -> None:
    """Load the weights of the run's newest complete checkpoint (or of ``ckpt``) into ``model``."""
    path = _resolve(run_dir, ckpt) / MODEL_FILE
    weights = _load_tensors(path)
    inner = getattr(model, "_orig_mod", model)
    own = inner.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise LmkitError(
            f"{path} does not match the run's model config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, value in weights.items():
        if value.shape != own[name].shape:
            raise LmkitError(f"{path}: tensor {name} has shape {tuple(value.shape)} but the run's "
                             f"model expects {tuple(own[name].shape)}; the checkpoint does not "
                             f"belong to this model config")
    try:
        inner.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise LmkitError(f"{path} does not load into the run's model: "
                         f"{str(exc).splitlines()[0]}") from None


def read_ema(run_dir: Path, ckpt: Path | None = None) -> dict[str, torch.Tensor] | None:
    """The weights' average saved with the run's newest complete checkpoint (or ``ckpt``), or
    None when that checkpoint holds none (its ``state.json`` lists the files it holds)."""
    ckpt = _resolve(run_dir, ckpt)
    files = read_state(run_dir, ckpt).get("files")
    if not isinstance(files, dict) or EMA_FILE not in files:
        return None
    return _load_tensors(ckpt / EMA_FILE)


def _load_optimizer(path: Path, i: int, opt: torch.optim.Optimizer,
                    tensors: dict[str, torch.Tensor], meta: Any) -> None:
    try:
        sd = _unflatten_optimizer(i, tensors, meta)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LmkitError(f"{path}: optimizer {i} state is malformed ({exc!r})") from None
    params = [p for group in opt.param_groups for p in group["params"]]
    for pid, values in sd["state"].items():
        if pid >= len(params):
            raise LmkitError(f"{path}: optimizer {i} has state for parameter {pid}, but the "
                             f"run's optimizer has {len(params)} parameters")
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[pid].shape:
                raise LmkitError(
                    f"{path}: opt{i}.{pid}.{key} has shape {tuple(value.shape)} but its "
                    f"parameter has {tuple(params[pid].shape)}; the checkpoint does not belong "
                    f"to this config")
    try:
        opt.load_state_dict(sd)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise LmkitError(f"{path}: optimizer {i} state does not match the run's optimizer "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                         ) from None


def load_checkpoint(
    run_dir: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]
) -> dict[str, Any]:
    """Restore model, optimizers and RNG; return the loop state saved with them.

    For the trainer only: it promotes an interrupted save's complete copy first.
    """
    ckpt = recover_checkpoint(run_dir)
    state = read_state(run_dir, ckpt)
    load_model_weights(run_dir, model, ckpt)
    ckpt = ckpt or Path(run_dir) / CHECKPOINT_DIR
    path = ckpt / OPTIM_FILE
    tensors = _load_tensors(path)
    if not isinstance(state["optimizers"], list) or len(state["optimizers"]) != len(optimizers):
        raise LmkitError(f"{run_dir}: checkpoint optimizers do not match the run's config")
    for i, (opt, meta) in enumerate(zip(optimizers, state["optimizers"], strict=True)):
        _load_optimizer(path, i, opt, tensors, meta)
    if "rng.cpu" not in tensors:
        raise LmkitError(f"{path} has no rng.cpu state; the checkpoint is incomplete")
    try:
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    except (RuntimeError, TypeError) as exc:
        raise LmkitError(f"{path}: the saved RNG state is invalid ({exc})") from None
    return state
