"""Checkpoints: tensors in safetensors (no pickle), everything else in JSON, written atomically.

A checkpoint is a directory ``checkpoint/`` holding ``model.safetensors``, ``optim.safetensors``
(optimizer tensors and RNG states) and ``state.json`` (step, tokens, loader position, optimizer
param groups). It is written to a temporary sibling and renamed into place, so a crash mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmkit.errors import LmkitError

CHECKPOINT_DIR = "checkpoint"
FORMAT = "lmkit-checkpoint/1"


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


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    state: dict[str, Any],
) -> Path:
    """Write model, optimizer and loop state; return the checkpoint directory."""
    final = Path(run_dir) / CHECKPOINT_DIR
    tmp = Path(run_dir) / f".{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in _model_state(model).items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    opt_tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        opt_tensors["rng.cuda"] = torch.cuda.get_rng_state()
    opt_meta = []
    for i, opt in enumerate(optimizers):
        tensors, meta = _flatten_optimizer(i, opt)
        opt_tensors.update(tensors)
        opt_meta.append(meta)
    save_file(opt_tensors, str(tmp / "optim.safetensors"), metadata={"format": FORMAT})
    payload = {"format": FORMAT, **state, "optimizers": opt_meta}
    (tmp / "state.json").write_text(json.dumps(payload, indent=1))
    old = Path(run_dir) / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # torch.compile wraps the module; store the plain names so checkpoints stay portable.
    inner = getattr(model, "_orig_mod", model)
    return inner.state_dict()


def read_json(path: Path, missing: str) -> Any:
    """A JSON file the user may have damaged: a clear error, never a traceback."""
    if not path.exists():
        raise LmkitError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LmkitError(f"{path} is corrupt: {exc}") from None


def read_state(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT_DIR / "state.json"
    state = read_json(path, f"{Path(run_dir)} has no checkpoint ({path} is missing)")
    if state.get("format") != FORMAT:
        raise LmkitError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    return state


def load_model_weights(run_dir: Path, model: torch.nn.Module) -> None:
    path = Path(run_dir) / CHECKPOINT_DIR / "model.safetensors"
    try:
        weights = load_file(str(path))
    except FileNotFoundError:
        raise LmkitError(f"{path} is missing") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise LmkitError(f"{path} is corrupt: {exc}") from None
    inner = getattr(model, "_orig_mod", model)
    missing, unexpected = inner.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise LmkitError(
            f"{path} does not match the run's model config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def load_checkpoint(
    run_dir: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]
) -> dict[str, Any]:
    """Restore model, optimizers and RNG; return the loop state saved with them."""
    state = read_state(run_dir)
    load_model_weights(run_dir, model)
    tensors = load_file(str(Path(run_dir) / CHECKPOINT_DIR / "optim.safetensors"))
    if len(state["optimizers"]) != len(optimizers):
        raise LmkitError(f"{run_dir}: checkpoint optimizers do not match the run's config")
    for i, (opt, meta) in enumerate(zip(optimizers, state["optimizers"], strict=True)):
        opt.load_state_dict(_unflatten_optimizer(i, tensors, meta))
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state
