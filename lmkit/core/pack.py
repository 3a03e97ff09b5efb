"""``lmkit pack``: quantize a run under the byte cap, load the artifact back, score the round trip.

The score that counts is always the one of the dequantized model read back from the file, so this
module writes the artifact, reads it from disk and evaluates that model with the run's own
objective (whatever it is: quantization sees only the Transformer). Calibration activations come
from the run's *training* shards through the objective's own training forward (so masked or
time-conditioned objectives see the inputs they were trained on); validation data is never used.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from lmkit import __version__
from lmkit.core import atomic, distributed, runs
from lmkit.core.artifact import COMPRESSIONS, load_artifact
from lmkit.core.capfit import fit_to_cap
from lmkit.core.defaults import DEFAULT_CALIB_TOKENS, DEFAULT_CAP_BYTES
from lmkit.core.device import resolve_device
from lmkit.core.evaluate import Scoring, evaluate_loaded
from lmkit.core.quant import (
    KEEP_FLOAT_MAX_NUMEL,
    collect_hessians,
    quantize_model,
)
from lmkit.errors import LmkitError
from lmkit.protocols import Batch

PACK_FILE = "pack.json"
Log = Callable[[str], None] | None


@dataclass(frozen=True)
class Recipe:
    """How to quantize: bit width, rounding (``gptq`` | ``rtn``), compression, the decimal byte
    cap (None = no cap), GPTQ calibration tokens and the size up to which tensors stay fp16.
    ``method`` defaults to gptq below 8 bits and the baseline's rtn at 8; ``compression`` to
    zlib for the int8 baseline and LZMA otherwise (the records' choice)."""

    bits: int = 6
    method: str | None = None
    compression: str | None = None
    cap_bytes: int | None = DEFAULT_CAP_BYTES
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    small_max: int = KEEP_FLOAT_MAX_NUMEL

    def __post_init__(self) -> None:  # refuse a bad recipe before minutes of evaluation
        method = self.method or ("rtn" if self.bits == 8 else "gptq")
        compression = self.compression or ("zlib" if self.bits == 8 and method == "rtn"
                                           else "lzma")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "compression", compression)
        check_recipe(self.bits, method, compression)
        if self.cap_bytes is not None and self.cap_bytes < 1:
            raise LmkitError(f"--cap-bytes must be a positive number of bytes, got "
                             f"{self.cap_bytes}")
        if self.calib_tokens < 1:
            raise LmkitError(f"--calib-tokens must be at least 1, got {self.calib_tokens}")

    @property
    def file_name(self) -> str:
        return artifact_name(self.bits, str(self.method), str(self.compression))


def check_recipe(bits: int, method: str, compression: str) -> None:
    """Refuse a bad recipe, naming the option."""
    if not 2 <= bits <= 8:
        raise LmkitError(f"--bits {bits}: choose 6 or 8 (2..8 are supported)")
    if method not in ("gptq", "rtn"):
        raise LmkitError(f"--method {method!r}: choose gptq or rtn")
    if compression not in COMPRESSIONS:
        raise LmkitError(f"--compression {compression!r}: choose zlib or lzma")


def artifact_name(bits: int, method: str, compression: str) -> str:
    return f"artifact.int{bits}-{method}.{compression}"


def calibration_batches(run: runs.Run, tokens: int,
                        data_dir: str | Path | None = None) -> Iterator[torch.Tensor]:
    """Training-shard batches (the run's seq_len and micro-batch) covering ``tokens`` tokens."""
    run.open_data(data_dir)
    seq = run.config.train.seq_len
    loader = run.loader(max(1, min(run.micro_batch, math.ceil(tokens / seq))))
    for _ in range(max(1, math.ceil(tokens / (loader.batch_size * seq)))):
        yield loader.next_batch()


def calibrate(run: runs.Run, tokens: int, data_dir: str | Path | None = None,
              model: torch.nn.Module | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Hessians of the matrix layers under the objective's training forward, seeded (forked RNG)."""
    model = run.model if model is None else model
    dev = next(model.parameters()).device
    step = int(run.state.get("step", 0))

    def forward() -> None:
        for tokens_batch in calibration_batches(run, tokens, data_dir):
            run.objective.loss(model, Batch(tokens=tokens_batch.to(dev), step=step))

    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(run.config.train.seed)
        was_training = model.training
        model.eval()
        try:
            return collect_hessians(model, forward)
        finally:
            model.train(was_training)


def artifact_meta(run: runs.Run, bits: int, method: str, compression: str) -> dict[str, Any]:
    """What makes an artifact self-describing: model, tokens, run, checkpoint, recipe."""
    model = run.model
    return {
        "lmkit": __version__,
        "run": str(Path(run.path).resolve()),
        "objective": run.config.objective,
        "checkpoint": {"step": run.state.get("step"), "tokens": run.state.get("tokens"),
                       "weights": run.weights},
        "model": {"config": asdict(model.cfg), "vocab_size": model.vocab_size,
                  "n_special": model.n_special},
        "tokens": run.meta["tokens"],
        "tokenizer_sha256": run.meta.get("data", {}).get("tokenizer", {}).get("sha256"),
        "bits": bits, "method": method, "compression": compression,
    }


def penalty(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per metric (matched by name): after − before, in the metric's unit."""
    by_name = {m["name"]: m for m in before}
    return [{"name": m["name"], "unit": m["unit"], "before": by_name[m["name"]]["value"],
             "after": m["value"], "delta": m["value"] - by_name[m["name"]]["value"]}
            for m in after if m["name"] in by_name]


def quantize_and_write(run: runs.Run, path: Path, recipe: Recipe, *,
                       data_dir: str | Path | None = None, log: Log = None) -> dict[str, Any]:
    """Quantize ``run.model``, prune to the cap, write ``path`` atomically; return the facts.

    Nothing is written when the cap cannot be met (the LmkitError comes first).
    """
    t0 = time.perf_counter()
    hessians, calib_rows = None, 0
    if recipe.method == "gptq":
        if log:
            log(f"calibrating on {recipe.calib_tokens:,} training tokens…")
        hessians, calib_rows = calibrate(run, recipe.calib_tokens, data_dir)
    tensors = quantize_model(run.model, bits=recipe.bits, method=recipe.method,
                             hessians=hessians, small_max=recipe.small_max)
    meta = artifact_meta(run, recipe.bits, recipe.method, recipe.compression)
    packed = fit_to_cap(tensors, meta, recipe.compression, recipe.cap_bytes, source=path, log=log)
    atomic.write_bytes(path, packed.data)
    size = os.path.getsize(path)
    if size != len(packed.data):
        raise LmkitError(f"{path}: wrote {len(packed.data)} bytes but the file has {size}")
    schemes = Counter(f"int{qt.bits}-{qt.method}" if qt.scheme == "int" else qt.scheme
                      for qt in packed.tensors)
    cap = recipe.cap_bytes
    return {
        "artifact": str(path.resolve()), "artifact_bytes": size, "cap_bytes": cap,
        "fits": cap is None or size <= cap, "bits": recipe.bits, "method": recipe.method,
        "compression": recipe.compression, "pruned_values": packed.pruned,
        "prunable_values": packed.candidates, "unpruned_bytes": packed.unpruned_bytes,
        "size_probes": packed.probes, "tensors": dict(sorted(schemes.items())),
        "calibration": None if hessians is None else {
            "source": "training shards", "tokens_per_layer": calib_rows},
        "quantize_seconds": round(time.perf_counter() - t0, 3),
    }


def roundtrip_metrics(run: runs.Run, path: Path, **scoring: Any) -> dict[str, Any]:
    """Score the model read back from ``path`` with the run's objective (eval JSON)."""
    model, _ = load_artifact(path, run.device, like=run.model)
    return evaluate_loaded(run, model=model, **scoring)


RECIPE_FIELDS = {f.name for f in fields(Recipe)}


def pack_run(run_dir: str | Path, *, device: str = "auto", out: str | Path | None = None,
             log: Log = None, **options: Any) -> dict[str, Any]:
    """Pack ``run_dir`` into ``RUN/artifact.int<bits>-<method>.<compression>`` and score it.

    ``options`` are :class:`Recipe` fields (bits, method, compression, cap_bytes,
    calib_tokens, small_max) and :class:`~lmkit.core.evaluate.Scoring` fields (max_tokens,
    options, data_dir, dtype, batch_size, seed). Returns (and writes to ``RUN/pack.json``) the
    artifact facts, ``metrics`` (the round-trip model's, same contract as ``lmkit eval``),
    ``metrics_before`` and ``penalty`` (after − before).
    """
    recipe = Recipe(**{k: v for k, v in options.items() if k in RECIPE_FIELDS})
    scoring = {k: v for k, v in options.items() if k not in RECIPE_FIELDS}
    Scoring(**scoring)  # unknown or bad scoring options fail before any work
    run = runs.load_run(run_dir, resolve_device(device))
    if run.export is not None:  # an artifact needs its run (tokenizer, data) and writes beside it
        raise LmkitError(f"{run_dir} is an `lmkit export` folder; pack the run it was exported "
                         f"from ({run.export['exported_from'].get('run')})")
    path = Path(out) if out else run.path / recipe.file_name
    # Quantize first: a cap that cannot be met fails before minutes of evaluation. Under
    # torchrun (`lmkit compare --pack`) rank 0 writes the artifact, then every rank scores its
    # share of it.
    facts = distributed.from_main(
        lambda: quantize_and_write(run, path, recipe, data_dir=scoring.get("data_dir"), log=log))
    if log:
        log(f"wrote {path} ({facts['artifact_bytes']:,} bytes); evaluating the checkpoint and "
            "the round trip…")
    before = evaluate_loaded(run, **scoring)
    after = roundtrip_metrics(run, path, **scoring)
    result = {
        "run": str(run.path.resolve()), "objective": run.config.objective,
        "checkpoint": after["checkpoint"], "params": after["params"], **facts,
        "data": after["data"], "precision": after["precision"], "seed": after["seed"],
        "metrics": after["metrics"], "metrics_before": before["metrics"],
        "penalty": penalty(before["metrics"], after["metrics"]),
    }
    if distributed.is_main():
        atomic.write_json(run.path / PACK_FILE, result)
    return result
