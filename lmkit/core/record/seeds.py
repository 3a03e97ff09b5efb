"""One seed of a record: its run's artifact (reused or packed), both evaluations, the training
figures from its log, the leak check of its data, and the files it leaves in ``seed_<seed>/``.

Every figure comes from a file the folder keeps (the copied log, ``run.json``, the evaluation
JSONs, the artifact), so ``lmkit record --check`` can recompute it without the run.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmkit.core import atomic, jsonfile, runs
from lmkit.core.artifact import load_artifact, read_artifact
from lmkit.core.evaluate import artifact_entry, evaluate_loaded, evaluate_run
from lmkit.core.pack import Recipe, quantize_and_write
from lmkit.core.record import layout
from lmkit.errors import LmkitError

Log = Callable[[str], None] | None


def metric_protocol(m: dict[str, Any]) -> str:
    """The context protocol a metric states in its ``detail`` (``protocol``), or what its detail
    says about it, marked as not stated."""
    detail = m.get("detail") or {}
    stated = detail.get("protocol")
    if stated is not None:
        return stated if isinstance(stated, str) else jsonfile.dumps(stated, sort_keys=True)
    parts = [str(detail["estimator"])] if detail.get("estimator") else []
    parts += [f"{k} {detail[k]}" for k in ("seq_len", "stride") if k in detail]
    return "not stated by the metric" + (f" ({', '.join(parts)})" if parts else "")


def log_figures(records: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """Steps and training seconds from a run's log: its last ``train`` record (the trainer logs
    the final step; its ``seconds`` count optimizer steps only, not validation or saving)."""
    train = [r for r in records if r.get("type") == "train"]
    if not train:
        raise LmkitError(f"{where} holds no training record: it is not a finished run's log")
    last = train[-1]
    step, seconds = last.get("step"), last.get("seconds")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise LmkitError(f"{where}: the last training record has no valid step ({step!r})")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) \
            or not math.isfinite(seconds) or seconds < 0:
        raise LmkitError(f"{where}: the last training record has no valid seconds "
                         f"({seconds!r})")
    return {"steps": step, "train_seconds": float(seconds),
            "train_wallclock_ms": round(1000 * float(seconds))}


def _reusable(path: Path, run: runs.Run, recipe: Recipe, budget: int | None) -> str | None:
    """Why the artifact at ``path`` cannot stand for this run's checkpoint (None: it can)."""
    if not path.is_file():
        return f"no {path.name} in the run"
    try:
        manifest, _ = read_artifact(path)
    except LmkitError as exc:
        return f"{path.name} does not read back ({exc})"
    step = (manifest.get("checkpoint") or {}).get("step")
    if step != run.state["step"]:
        return f"{path.name} was packed from step {step}, the checkpoint is at {run.state['step']}"
    made = (manifest.get("bits"), manifest.get("method"), manifest.get("compression"))
    if made != (recipe.bits, recipe.method, recipe.compression):
        return f"{path.name} holds another recipe {made}"
    if manifest.get("tokenizer_sha256") != run.tokenizer.sha256:
        return f"{path.name} was packed with another tokenizer"
    if budget is not None and path.stat().st_size > budget:
        return (f"{path.name} is {path.stat().st_size:,} bytes, over the {budget:,} left for "
                "the artifact")
    return None


def place_artifact(run: runs.Run, dest: Path, recipe: Recipe, budget: int | None,
                   data_dir: str | Path | None, log: Log) -> dict[str, Any]:
    """Put the seed's artifact at ``dest``: the run's own if it is valid for the checkpoint and
    fits ``budget``, else a fresh one from the pack path (``budget`` as its cap; without a cap
    when none fits, so the record shows it over the cap)."""
    why = _reusable(run.path / recipe.file_name, run, recipe, budget)
    if why is None:
        atomic.write_bytes(dest, (run.path / recipe.file_name).read_bytes())
        return {"artifact_reused": True,
                "artifact_note": f"reused the run's {recipe.file_name} (lmkit pack)"}
    if log:
        log(f"{run.path}: packing ({why})")
    if budget is not None and budget > 0:
        try:
            quantize_and_write(run, dest, replace(recipe, cap_bytes=budget), data_dir=data_dir,
                               log=log)
            return {"artifact_reused": False,
                    "artifact_note": f"packed by lmkit record, cap {budget:,} bytes ({why})"}
        except LmkitError as exc:
            why = f"{why}; the cap could not be met: {exc}"
    quantize_and_write(run, dest, replace(recipe, cap_bytes=None), data_dir=data_dir, log=log)
    return {"artifact_reused": False,
            "artifact_note": f"packed by lmkit record without a cap ({why})"}


def headline(metrics: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """The objective's headline metric: its first (what ``lmkit compare`` tests as primary)."""
    if not metrics:
        raise LmkitError(f"{where}: the evaluation returned no metric")
    return metrics[0]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def seed_entry(seed: int, env: dict[str, Any], log_records: list[dict[str, Any]],
               before: dict[str, Any], after: dict[str, Any], artifact: Path) -> dict[str, Any]:
    """The per-seed figures of ``submission.json``, from the files the seed leaves behind:
    its log's records, its run.json ``environment``, the two evaluations and the artifact."""
    sub = layout.seed_dir(seed)
    figures = log_figures(log_records, f"{sub}/{layout.LOG_FILE}")
    head = headline(after["metrics"], f"{sub}/{layout.EVAL_ARTIFACT_FILE}")
    pre = {m["name"]: m for m in before["metrics"]}.get(head["name"])
    if pre is None:
        raise LmkitError(f"{sub}/{layout.EVAL_CHECKPOINT_FILE} has no {head['name']!r} metric")
    quant, pre_value = _number(head["value"]), _number(pre["value"])
    metrics = [{"name": m["name"], "kind": m["kind"], "value": _number(m["value"]),
                "unit": m["unit"], "stderr": m["stderr"], "tokens": m["tokens"],
                "bytes": m["bytes"], "protocol": metric_protocol(m),
                "pre_quant_value": _number(next((b["value"] for b in before["metrics"]
                                                 if b["name"] == m["name"]), None))}
               for m in after["metrics"]]
    return {
        "seed": seed,
        "objective": after["objective"],
        "log": f"{sub}/{layout.LOG_FILE}",
        "run_json": f"{sub}/{layout.RUN_FILE}",
        "artifact": f"{sub}/{artifact.name}",
        "artifact_bytes": artifact.stat().st_size,
        "metric": head["name"], "kind": head["kind"], "unit": head["unit"],
        "protocol": metric_protocol(head),
        "val_bpb": quant, "quantized_val_bpb": quant, "pre_quant_val_bpb": pre_value,
        "quantization_penalty": None if quant is None or pre_value is None else quant - pre_value,
        "val_bpb_stderr": head["stderr"],
        **figures,
        "eval_time_s": round(after["load_seconds"] + after["seconds"], 3),
        "val_tokens": head["tokens"], "val_bytes": head["bytes"],
        "eval_targets": after["data"]["val_targets"], "target_tokens": after["target_tokens"],
        "metrics": metrics,
        "train_hardware": hardware_of(env),
        "train_environment": {k: env.get(k) for k in ("lmkit", "torch", "python", "device",
                                                      "gpu", "world_size", "git_sha")},
    }


def hardware_of(env: dict[str, Any]) -> str:
    """A device in words: the GPU's name (with the process count where recorded), else the
    device type and platform."""
    count = env.get("world_size")
    if env.get("gpu"):
        return f"{count}x {env['gpu']}" if isinstance(count, int) else str(env["gpu"])
    return f"{env.get('device', 'unknown device')} ({env.get('platform', 'unknown platform')})"


def record_seed(run_dir: Path, folder: Path, *, recipe: Recipe, budget: int | None,
                scoring: dict[str, Any], device: str, leak_cache: dict[str, Any],
                log: Log = None) -> dict[str, Any]:
    """Write ``folder/seed_<seed>/`` for the run in ``run_dir``; return its entry."""
    from lmkit.core.device import resolve_device

    before = evaluate_run(run_dir, device=device, latest=False, reuse=True, **scoring)
    run = runs.load_run(run_dir, resolve_device(device))
    seed = run.config.train.seed
    sub = folder / layout.seed_dir(seed)
    sub.mkdir(parents=True, exist_ok=True)
    records = runs.read_metrics(run.path)  # checked against the checkpoint by the preflight
    shutil.copyfile(run.path / runs.METRICS_FILE, sub / layout.LOG_FILE)
    shutil.copyfile(run.path / runs.RUN_FILE, sub / layout.RUN_FILE)
    artifact = sub / recipe.file_name
    facts = place_artifact(run, artifact, recipe, budget, scoring.get("data_dir"), log)
    t0 = time.perf_counter()
    model, manifest = load_artifact(artifact, run.device, like=run.model)
    load_seconds = time.perf_counter() - t0
    after = evaluate_loaded(run, model=model, **scoring)
    # the whole validation set's targets, whatever prefix was scored
    target_tokens = int(run.val_tokens(None, scoring.get("data_dir")).numel()) - 1
    after.update(artifact={**artifact_entry(artifact, manifest), "path": artifact.name},
                 load_seconds=round(load_seconds, 3), target_tokens=target_tokens)
    atomic.write_json(sub / layout.EVAL_CHECKPOINT_FILE, before)
    atomic.write_json(sub / layout.EVAL_ARTIFACT_FILE, after)
    entry = seed_entry(seed, run.meta.get("environment") or {}, records,
                       jsonfile.read_json(sub / layout.EVAL_CHECKPOINT_FILE),
                       jsonfile.read_json(sub / layout.EVAL_ARTIFACT_FILE), artifact)
    entry.update(facts, run=str(run.path.resolve()),
                 leak_check=leak_report(Path(scoring.get("data_dir") or run.data_dir),
                                        leak_cache))
    return entry


def leak_report(data_dir: Path, cache: dict[str, Any]) -> dict[str, Any] | None:
    """``lmkit data check``'s verdict on the run's data (cached per directory), or None when the
    data is not here to check."""
    from lmkit.core.data import check_data

    key = str(data_dir.resolve())
    if key not in cache:
        if not data_dir.is_dir():
            cache[key] = None
        else:
            report = check_data(data_dir)
            cache[key] = {"dir": key, "ok": report["ok"], "leak": report["leak"],
                          "problems": report["problems"],
                          "overlap_documents": sum(c["overlap_documents"]
                                                   for c in report["checks"]),
                          "checks": [c["name"] for c in report["checks"]]}
    return cache[key]
