"""The one run-directory layout, and loading a run back from it.

::

    RUN/
      config.toml        resolved config; `lmkit train --config RUN/config.toml` re-runs it
      run.json           environment (versions, device, git SHA, plugins), data, model, tokens
      tokenizer.model    copy of the tokenizer the run was trained with
      metrics.jsonl      one JSON record per log step and per validation
      checkpoint/        model.safetensors, optim.safetensors, state.json
      eval.json          the latest `lmkit eval` result
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmkit import __version__
from lmkit.core import config as config_mod
from lmkit.core.checkpoint import CHECKPOINT_DIR, load_model_weights, read_json, read_state
from lmkit.errors import LmkitError
from lmkit.protocols import TokenSpec

RUN_FILE = "run.json"
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
TOKENIZER_FILE = "tokenizer.model"


def default_run_dir(objective: str, preset: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{objective}-{preset}-{stamp}"


def git_sha() -> str | None:
    """The SHA of the lmkit checkout, when lmkit runs from one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    from lmkit.core.registry import get_registry

    registry = get_registry()
    env: dict[str, Any] = {
        "lmkit": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "git_sha": git_sha(),
        "argv": sys.argv,
        "plugins": [
            {"name": p.name, "distribution": p.distribution, "version": p.version}
            for p in registry.plugins.values()
        ],
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """Append-only JSONL: the machine-readable half of the one logging path."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint so the log matches the weights."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Run:
    """A trained run, loaded back from its directory (see :func:`load_run`)."""

    path: Path
    config: config_mod.RunConfig
    meta: dict[str, Any]
    state: dict[str, Any]
    tokens: TokenSpec
    objective: Any
    model: torch.nn.Module

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild objective and model from a run directory and load its latest checkpoint."""
    from lmkit.core.registry import get_objective
    from lmkit.core.trunk import Transformer

    run_dir = Path(path)
    meta_path = run_dir / RUN_FILE
    if not run_dir.is_dir():
        raise LmkitError(f"run directory {run_dir} does not exist")
    meta = read_json(meta_path,
                     f"{run_dir} is not an lmkit run directory ({RUN_FILE} is missing)")
    cfg = config_mod.from_dict(meta["config"])
    entry = get_objective(cfg.objective)
    tokens = TokenSpec(**meta["tokens"])
    options = config_mod.build_options(entry.obj.Options, cfg.options, "options")
    objective = entry.obj(options, tokens)
    model_cfg = config_mod.model_config_from_dict(meta["model"]["config"])
    model = Transformer(model_cfg, tokens.vocab_size, len(tokens.special))
    state = read_state(run_dir)
    load_model_weights(run_dir, model)
    model.to(torch.device(device)).eval()
    return Run(run_dir, cfg, meta, state, tokens, objective, model)


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / "state.json").exists()


def model_meta(model_cfg: Any, model: torch.nn.Module) -> dict[str, Any]:
    from lmkit.core.trunk import count_params

    return {
        "config": dataclasses.asdict(model_cfg),
        "params": count_params(model),
        "padded_vocab": getattr(model, "padded_vocab", None),
    }
