"""Evaluation results kept per protocol, so one result never overwrites another's.

``RUN/evals/<key>.json`` holds the ``lmkit eval --json`` object of one protocol: checkpoint step,
validation prefix, objective options, precision, Monte-Carlo seed, validation source and lmkit
version. ``<key>.units.safetensors`` beside it holds each Monte-Carlo metric's independent units
(nats per sequence and replicate), which ``lmkit compare`` pairs across runs scored with the
same draws. ``RUN/eval.json`` is a copy of the latest ``lmkit eval`` result, for people.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from lmkit.core import atomic, jsonfile
from lmkit.core.runs import EVAL_FILE
from lmkit.errors import LmkitError

EVALS_DIR = "evals"


def protocol_key(protocol: dict[str, Any]) -> str:
    """A readable, stable file name for ``protocol``: step, prefix and a digest of the rest."""
    text = jsonfile.dumps(protocol, sort_keys=True)  # the options' order does not matter
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    prefix = protocol.get("max_tokens") or "all"
    return f"step{protocol.get('checkpoint_step')}-{prefix}tok-{digest}"


def record_path(run_dir: Path, protocol: dict[str, Any]) -> Path:
    return Path(run_dir) / EVALS_DIR / f"{protocol_key(protocol)}.json"


def _units_path(record: Path) -> Path:
    return record.with_suffix(".units.safetensors")


def save(run_dir: Path, result: dict[str, Any], units: dict[str, torch.Tensor] | None = None,
         *, latest: bool) -> Path:
    """Keep ``result`` under its protocol (and, with ``latest``, as ``RUN/eval.json``)."""
    from safetensors.torch import save as to_bytes

    path = record_path(run_dir, result["protocol"])
    path.parent.mkdir(parents=True, exist_ok=True)
    if units:
        atomic.write_bytes(_units_path(path), to_bytes(
            {name: t.detach().cpu().double().contiguous() for name, t in units.items()}))
    atomic.write_json(path, result)
    if latest:
        atomic.write_json(Path(run_dir) / EVAL_FILE, result)
    return path


def load(run_dir: Path, protocol: dict[str, Any]
         ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The stored result of exactly ``protocol`` and its units, or None (missing or damaged:
    then it is simply evaluated again)."""
    path = record_path(run_dir, protocol)
    if not path.is_file():
        return None
    try:
        result = jsonfile.read_json(path)
    except LmkitError:
        return None
    if result.get("protocol") != json.loads(jsonfile.dumps(protocol)):
        return None
    try:
        return result, load_units(path)
    except LmkitError:
        return None


def load_units(record: Path) -> dict[str, torch.Tensor]:
    """The units stored beside ``record`` ({} when there are none)."""
    from safetensors.torch import load_file

    path = _units_path(Path(record))
    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own types on a damaged file
        raise LmkitError(f"{path} is corrupt ({exc}); delete it to evaluate again") from None
