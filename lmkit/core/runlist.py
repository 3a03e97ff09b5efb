"""``lmkit runs``: the run directories under a folder, newest first, with their latest figures.

Reads only the JSON each run already holds (``run.json``, ``checkpoint/state.json``,
``metrics.jsonl``), never weights, and imports nothing heavy: it answers at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"  # the layout of lmkit.core.runs (kept torch-free here)
STATE_FILE = Path("checkpoint") / "state.json"
METRICS_FILE = "metrics.jsonl"
MAX_DEPTH = 4  # DIR/runs/x, DIR/comparisons/<stamp>/runs/x


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None  # ValueError: bad JSON, or an integer too long to convert


def _last_val(path: Path) -> tuple[dict[str, Any] | None, int | None]:
    """(first metric of the last validation record, its step) from metrics.jsonl."""
    last = None
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None, None
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a torn line (e.g. a crash mid-write) is skipped
        if isinstance(record, dict) and record.get("type") == "val" and record.get("metrics"):
            last = record
    if last is None or not isinstance(last["metrics"], list) \
            or not isinstance(last["metrics"][0], dict):
        return None, None
    return last["metrics"][0], last.get("step")


def find_runs(root: Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Directories under ``root`` (itself included) that hold a ``run.json``."""
    found: list[Path] = []
    root = Path(root)
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if RUN_FILE in filenames:
            found.append(here)
            dirnames[:] = []  # a run holds no runs
            continue
        if len(here.parts) - base >= max_depth:
            dirnames[:] = []
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return found


def describe(run_dir: Path) -> dict[str, Any]:
    """One row: what the run is, how far it got, and its latest validation figure."""
    meta = _json(run_dir / RUN_FILE)
    state = _json(run_dir / STATE_FILE)
    metric, val_step = _last_val(run_dir / METRICS_FILE)
    meta = meta if isinstance(meta, dict) else {}
    state = state if isinstance(state, dict) else {}
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    stamps = [p.stat().st_mtime for p in (run_dir / METRICS_FILE, run_dir / RUN_FILE)
              if p.exists()]
    return {
        "path": str(run_dir.resolve()),
        "objective": meta.get("objective"),
        "preset": config.get("preset"),
        "params": (meta.get("model") or {}).get("params") if isinstance(meta.get("model"), dict)
        else None,
        "checkpoint_step": state.get("step"),
        "tokens": state.get("tokens"),
        "latest_val": None if metric is None else {
            k: metric.get(k) for k in ("name", "kind", "value", "stderr", "unit", "tokens")},
        "latest_val_step": val_step,
        "modified": max(stamps) if stamps else None,
        "readable": bool(meta),
    }


def list_runs(root: str | Path = ".") -> list[dict[str, Any]]:
    """Every run under ``root``, newest first."""
    rows = [describe(d) for d in find_runs(Path(root))]
    return sorted(rows, key=lambda r: r["modified"] or 0.0, reverse=True)
