"""``lmkit eval``: score a run's checkpoint (or a packed artifact) on validation data, per the
JSON contract. The scoring options are one value, :class:`Scoring`, shared with ``lmkit pack``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmkit import __version__
from lmkit.core import distributed, evalstore, runs
from lmkit.core.bpb import Metric
from lmkit.core.build import CallCounter
from lmkit.core.contexts import UNSTATED, protocol_of
from lmkit.core.device import resolve_device
from lmkit.errors import LmkitError
from lmkit.protocols import EvalContext


@dataclass(frozen=True)
class Scoring:
    """What to score and how (``lmkit eval`` / ``lmkit pack`` options): a validation prefix of
    ``max_tokens`` targets, the objective's ``--opt`` options, the data directory if it moved,
    the precision, the batch (default: the training micro-batch) and the Monte-Carlo seed."""

    max_tokens: int | None = None
    options: dict[str, Any] | None = None
    data_dir: str | Path | None = None
    dtype: str | None = None
    batch_size: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise LmkitError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.batch_size is not None and self.batch_size < 1:
            raise LmkitError(f"--batch-size must be at least 1, got {self.batch_size}")


def run_evaluation(model: torch.nn.Module, objective: Any, ctx: EvalContext) -> list[Metric]:
    """``objective.evaluate`` in eval mode under inference mode (no autograd bookkeeping at all,
    faster than ``no_grad``); every result must be a Metric.

    A metric whose detail names no context protocol gets ``"protocol": "unstated"``
    (:mod:`lmkit.core.contexts`): said, not guessed."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            metrics = objective.evaluate(model, ctx)
    finally:
        model.train(was_training)
    for m in metrics:
        if not isinstance(m, Metric):
            raise TypeError(f"objective {objective.name!r} returned {type(m).__name__}, not Metric")
        if protocol_of(m) == UNSTATED:
            m.detail = {**m.detail, "protocol": UNSTATED}
    return metrics


def make_eval_context(run: runs.Run, *, val_tokens: torch.Tensor | None = None,
                      purpose: str = "eval", progress: Any = None, **scoring: Any) -> EvalContext:
    """The EvalContext ``lmkit eval`` gives the run's objective; ``scoring`` are
    :class:`Scoring`'s fields. ``val_tokens`` (a slice of the validation stream) replaces the
    ``max_tokens`` prefix: benchmarks score disjoint blocks."""
    s = Scoring(**scoring)
    if val_tokens is None:
        val_tokens = run.val_tokens(s.max_tokens, s.data_dir)
    return run.eval_context(val_tokens, purpose=purpose, options=s.options,
                            batch_size=s.batch_size, seed=s.seed, precision=s.dtype,
                            progress=progress)


def protocol(run: runs.Run, s: Scoring) -> dict[str, Any]:
    """Everything an evaluation's numbers depend on besides the weights' values: the key under
    which its result is kept (``RUN/evals/``) and reused. The batch size is not in it: no
    figure depends on it."""
    return {"checkpoint_step": run.state["step"], "max_tokens": s.max_tokens,
            "options": s.options or {}, "dtype": s.dtype,
            "seed": run.cfg.train.seed if s.seed is None else s.seed,
            "val_source": run.val_origin(s.data_dir), "lmkit": __version__}


def evaluate_loaded(run: runs.Run, *, model: torch.nn.Module | None = None,
                    val_tokens: torch.Tensor | None = None, purpose: str = "eval",
                    progress: Any = None, units: dict[str, torch.Tensor] | None = None,
                    **scoring: Any) -> dict[str, Any]:
    """Score ``model`` (default: the run's own) with the run's objective on its validation data.

    ``model`` lets a caller score a modified copy, e.g. the dequantized round trip of an
    artifact. Returns the ``lmkit eval --json`` object, with ``costs`` (seconds and model calls
    per metric). ``units``, when given, receives each Monte-Carlo metric's independent units.
    """
    model = run.model if model is None else model
    ctx = make_eval_context(run, val_tokens=val_tokens, purpose=purpose, progress=progress,
                            **scoring)
    t0 = time.perf_counter()
    with CallCounter(model) as counter:
        ctx.model_calls = lambda: counter.calls
        metrics = run_evaluation(model, run.objective, ctx)
        end = (time.perf_counter(), counter.calls)
    costs = []
    for (name, t, c), nxt in zip(ctx.marks, [*((t, c) for _, t, c in ctx.marks[1:]), end],
                                 strict=True):
        costs.append({"metric": name, "seconds": round(nxt[0] - t, 3), "model_calls": nxt[1] - c})
    s = Scoring(**scoring)
    if units is not None:
        units.update({m.name: m.units for m in metrics if m.units is not None})
    return {
        "run": str(run.path.resolve()),
        "objective": run.config.objective,
        "checkpoint": {"step": run.state["step"], "tokens": run.state["tokens"],
                       "weights": run.weights},
        "params": run.meta["model"]["params"],
        "data": {"dir": str(s.data_dir or run.data_dir),
                 "val_source": run.val_origin(s.data_dir),
                 "val_targets": int(ctx.val_tokens.numel() - 1),
                 "max_tokens": s.max_tokens, "tokenizer_sha256": run.tokenizer.sha256},
        "precision": ctx.precision,
        "seed": ctx.seed,
        "protocol": protocol(run, s),
        "seconds": round(end[0] - t0, 3),
        "metrics": [m.to_dict() for m in metrics],
        "costs": costs,
    }


def evaluate_run(run_dir: str | Path, *, device: str = "auto", latest: bool = True,
                 reuse: bool = False, units: dict[str, torch.Tensor] | None = None,
                 progress: Any = None, **scoring: Any) -> dict[str, Any]:
    """Evaluate ``run_dir``'s checkpoint and keep the result under its protocol (and, with
    ``latest``, as ``RUN/eval.json``); return the JSON object. With ``reuse``, a result already
    kept for exactly this protocol is returned instead of evaluating again (with
    ``reused_from`` naming its file)."""
    run = runs.load_run(run_dir, device=resolve_device(device))
    return evaluate_stored(run, latest=latest, reuse=reuse, units=units, progress=progress,
                           **scoring)


def evaluate_stored(run: runs.Run, *, latest: bool = True, reuse: bool = False,
                    units: dict[str, torch.Tensor] | None = None, progress: Any = None,
                    **scoring: Any) -> dict[str, Any]:
    """:func:`evaluate_run` of a run already loaded (``lmkit export`` loads it once)."""
    units = {} if units is None else units
    proto = protocol(run, Scoring(**scoring))
    if reuse and (stored := evalstore.load(run.path, proto)):
        units.update(stored[1])
        return {**stored[0], "reused_from": str(evalstore.record_path(run.path, proto))}
    result = evaluate_loaded(run, units=units, progress=progress, **scoring)
    if distributed.is_main():
        evalstore.save(run.path, result, units, latest=latest)
    return result


def find_run_dir(path: Path, manifest: dict[str, Any]) -> Path:
    """The run an artifact belongs to: the directory it sits in, else the one it names."""
    for candidate in (path.parent, Path(str(manifest.get("run", "")))):
        if (candidate / runs.RUN_FILE).is_file():
            return candidate
    raise LmkitError(
        f"artifact {path}: cannot find its run directory (neither {path.parent} nor "
        f"{manifest.get('run')!r} holds {runs.RUN_FILE}); put the artifact back in its run "
        "directory, which holds the tokenizer and the data location evaluation needs"
    )


def load_target(path: str | Path, device: str = "auto"
                ) -> tuple[runs.Run, torch.nn.Module, dict[str, Any] | None]:
    """(run, model, artifact manifest) of a run directory (its checkpoint; no manifest), of an
    export folder (its weights; ``run.export`` is set) or of a packed artifact file (its
    dequantized round trip, with the run it was packed from)."""
    from lmkit.core.artifact import model_from_tensors, read_artifact

    path = Path(path)
    dev = resolve_device(device)
    if not path.is_file():
        run = runs.load_run(path, dev)
        return run, run.model, None
    manifest, tensors = read_artifact(path)
    run = runs.load_run(find_run_dir(path, manifest), dev)
    return run, model_from_tensors(manifest, tensors, path, like=run.model).eval(), manifest


def evaluate_artifact(path: str | Path, *, device: str = "auto", **scoring: Any) -> dict[str, Any]:
    """``lmkit eval ARTIFACT``: score a packed artifact with its run's objective and data."""
    path = Path(path)
    run, model, manifest = load_target(path, device)
    if manifest is None:
        raise LmkitError(f"{path} is a run directory, not a packed artifact")
    result = evaluate_loaded(run, model=model, **scoring)
    result["artifact"] = artifact_entry(path, manifest)
    return result


def artifact_entry(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What an evaluation of an artifact records about the file."""
    return {"path": str(path.resolve()), "bytes": path.stat().st_size,
            "bits": manifest.get("bits"), "method": manifest.get("method"),
            "compression": manifest.get("compression"),
            "pruned_values": manifest.get("pruned_values")}


def evaluate_target(path: str | Path, *, device: str = "auto", judge: str | Path | None = None,
                    generation: dict[str, Any] | None = None, **scoring: Any) -> dict[str, Any]:
    """``lmkit eval PATH [--gen --judge AR_RUN]``: score a run or an artifact, optionally add
    generation metrics of its samples under ``judge`` (``generation``: sampler, num, length,
    steps), and write a run's ``eval.json`` once, with everything in it."""
    path = Path(path)
    if not path.exists():
        raise LmkitError(f"{path} does not exist: pass a run directory, an export folder or a "
                         "packed artifact")
    run, model, manifest = load_target(path, device)
    if generation is not None:
        from lmkit.core.genmetrics import check_judge

        if judge is None:
            raise LmkitError("--gen needs --judge AR_RUN: an AR run trained with the same "
                             "tokenizer scores the samples")
        check_judge(run.path, judge)  # fail before a long evaluation
    units: dict[str, torch.Tensor] = {}
    result = evaluate_loaded(run, model=model, units=units, **scoring)
    if manifest is not None:
        result["artifact"] = artifact_entry(path, manifest)
    if generation is not None:
        from lmkit.core.genmetrics import add_generation_metrics

        result = add_generation_metrics(result, judge, device=device, seed=scoring.get("seed"),
                                        **generation)
        result["protocol"]["generation"] = {"judge": str(Path(judge).resolve()), **generation}
    if run.export is not None:  # an export folder is shared as written: nothing is added to it
        result["export"] = {"path": str(run.path.resolve()),
                            "exported_from": run.export["exported_from"]}
    elif manifest is None:
        result["files"] = {"latest": str((run.path / runs.EVAL_FILE).resolve()),
                           "record": str(evalstore.record_path(run.path.resolve(),
                                                               result["protocol"]))}
        if distributed.is_main():
            evalstore.save(run.path, result, units, latest=True)
    return result
