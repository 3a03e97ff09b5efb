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
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkit import __version__
from lmkit.core import runs
from lmkit.core.data import RotatingLoader, load_val_tokens, open_data
from lmkit.core.device import resolve_device
from lmkit.core.evaluate import evaluate_loaded
from lmkit.core.quant import (
    COMPRESSIONS,
    DEFAULT_CAP_BYTES,
    KEEP_FLOAT_MAX_NUMEL,
    collect_hessians,
    fit_to_cap,
    load_artifact,
    quantize_model,
    write_atomic,
)
from lmkit.core.train import batch_geometry
from lmkit.errors import LmkitError
from lmkit.protocols import Batch

PACK_FILE = "pack.json"
DEFAULT_CALIB_TOKENS = 65_536
Log = Callable[[str], None] | None


def default_compression(bits: int, method: str) -> str:
    """zlib for the baseline int8 recipe, LZMA for everything else (the records' choice)."""
    return "zlib" if bits == 8 and method == "rtn" else "lzma"


def check_recipe(bits: int, method: str, compression: str) -> None:
    """Refuse a bad recipe before minutes of evaluation, naming the option."""
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
    data = open_data(Path(data_dir or run.meta["data"]["dir"]), run.tokenizer_path)
    seq = run.config.train.seq_len
    micro = max(1, min(batch_geometry(run.config)[0], math.ceil(tokens / seq)))
    loader = RotatingLoader(data.train_shards, batch_size=micro, seq_len=seq,
                            seed=run.config.train.seed, vocab_size=data.vocab_size)
    for _ in range(max(1, math.ceil(tokens / (micro * seq)))):
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
        "checkpoint": {"step": run.state.get("step"), "tokens": run.state.get("tokens")},
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


def quantize_and_write(
    run: runs.Run, path: Path, *, bits: int, method: str, compression: str,
    cap_bytes: int | None, calib_tokens: int, data_dir: str | Path | None = None,
    small_max: int = KEEP_FLOAT_MAX_NUMEL, log: Log = None,
) -> dict[str, Any]:
    """Quantize ``run.model``, prune to the cap, write ``path`` atomically; return the facts.

    Nothing is written when the cap cannot be met (the LmkitError comes first).
    """
    t0 = time.perf_counter()
    hessians, calib_rows = None, 0
    if method == "gptq":
        if log:
            log(f"calibrating on {calib_tokens:,} training tokens…")
        hessians, calib_rows = calibrate(run, calib_tokens, data_dir)
    tensors = quantize_model(run.model, bits=bits, method=method, hessians=hessians,
                             small_max=small_max)
    meta = artifact_meta(run, bits, method, compression)
    packed = fit_to_cap(tensors, meta, compression, cap_bytes, source=path, log=log)
    write_atomic(path, packed.data)
    size = os.path.getsize(path)
    assert size == len(packed.data), f"{path}: wrote {len(packed.data)} bytes, file has {size}"
    schemes = Counter(f"int{qt.bits}-{qt.method}" if qt.scheme == "int" else qt.scheme
                      for qt in packed.tensors)
    return {
        "artifact": str(path), "artifact_bytes": size, "cap_bytes": cap_bytes,
        "fits": cap_bytes is None or size <= cap_bytes, "bits": bits, "method": method,
        "compression": compression, "pruned_values": packed.pruned,
        "prunable_values": packed.candidates, "unpruned_bytes": packed.unpruned_bytes,
        "size_probes": packed.probes, "tensors": dict(sorted(schemes.items())),
        "calibration": None if hessians is None else {
            "source": "training shards", "tokens_per_layer": calib_rows},
        "quantize_seconds": round(time.perf_counter() - t0, 3),
    }


def roundtrip_metrics(run: runs.Run, path: Path, **eval_kwargs: Any) -> dict[str, Any]:
    """Score the model read back from ``path`` with the run's objective (eval JSON)."""
    dev = next(run.model.parameters()).device
    model, _ = load_artifact(path, dev)
    return evaluate_loaded(run, model=model, **eval_kwargs)


def pack_run(
    run_dir: str | Path,
    *,
    bits: int = 6,
    method: str | None = None,
    cap_bytes: int | None = DEFAULT_CAP_BYTES,
    compression: str | None = None,
    device: str = "auto",
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    max_tokens: int | None = None,
    eval_options: dict[str, Any] | None = None,
    data_dir: str | Path | None = None,
    batch_size: int | None = None,
    dtype: str | None = None,
    small_max: int = KEEP_FLOAT_MAX_NUMEL,
    out: str | Path | None = None,
    log: Log = None,
) -> dict[str, Any]:
    """Pack ``run_dir`` into ``RUN/artifact.int<bits>-<method>.<compression>`` and score it.

    Returns (and writes to ``RUN/pack.json``) the artifact facts, ``metrics`` (the round-trip
    model's, same contract as ``lmkit eval``), ``metrics_before`` and ``penalty`` (after − before).
    ``method`` defaults to gptq for bits < 8 and to the baseline's rtn for bits = 8.
    """
    method = method or ("rtn" if bits == 8 else "gptq")
    compression = compression or default_compression(bits, method)
    check_recipe(bits, method, compression)
    if cap_bytes is not None and cap_bytes < 1:
        raise LmkitError(f"--cap-bytes must be a positive number of bytes, got {cap_bytes}")
    if calib_tokens < 1:
        raise LmkitError(f"--calib-tokens must be at least 1, got {calib_tokens}")
    run = runs.load_run(run_dir, resolve_device(device))
    path = Path(out) if out else run.path / artifact_name(bits, method, compression)
    eval_kwargs = {"max_tokens": max_tokens, "options": eval_options, "data_dir": data_dir,
                   "batch_size": batch_size, "dtype": dtype}
    # Quantize first: a cap that cannot be met fails before minutes of evaluation.
    facts = quantize_and_write(run, path, bits=bits, method=method, compression=compression,
                               cap_bytes=cap_bytes, calib_tokens=calib_tokens, data_dir=data_dir,
                               small_max=small_max, log=log)
    if log:
        log(f"wrote {path} ({facts['artifact_bytes']:,} bytes); evaluating the checkpoint and "
            "the round trip…")
    before = evaluate_loaded(run, **eval_kwargs)
    after = roundtrip_metrics(run, path, **eval_kwargs)
    result = {
        "run": str(run.path), "objective": run.config.objective,
        "checkpoint": after["checkpoint"], "params": after["params"], **facts,
        "data": after["data"], "precision": after["precision"], "seed": after["seed"],
        "metrics": after["metrics"], "metrics_before": before["metrics"],
        "penalty": penalty(before["metrics"], after["metrics"]),
    }
    runs.write_json(run.path / PACK_FILE, result)
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


def evaluate_artifact(path: str | Path, *, device: str = "auto", **kwargs: Any) -> dict[str, Any]:
    """``lmkit eval ARTIFACT``: score a packed artifact with its run's objective and data.

    ``kwargs`` are :func:`evaluate_loaded`'s (max_tokens, options, data_dir, batch_size, …).
    """
    path = Path(path)
    dev = resolve_device(device)
    model, manifest = load_artifact(path, dev)
    run = runs.load_run(find_run_dir(path, manifest), dev)
    if asdict(run.model.cfg) != manifest["model"]["config"]:
        raise LmkitError(f"artifact {path} was packed from a model with another config than "
                         f"the run in {run.path}; re-pack it from that run")
    result = evaluate_loaded(run, model=model, **kwargs)
    result["artifact"] = {"path": str(path), "bytes": path.stat().st_size,
                          "bits": manifest.get("bits"), "method": manifest.get("method"),
                          "compression": manifest.get("compression"),
                          "pruned_values": manifest.get("pruned_values")}
    return result


def bench_recipes(bits: tuple[int, ...] = (6,)) -> list[tuple[str, int, str, str]]:
    """(label, bits, method, compression): baseline int8/zlib, then rtn and gptq at each width."""
    recipes = [("int8/zlib", 8, "rtn", "zlib")]
    for b in bits:
        check_recipe(b, "gptq", "lzma")
        recipes += [(f"int{b} {m}/lzma", b, m, "lzma") for m in ("rtn", "gptq")]
    return recipes


def val_blocks(run: runs.Run, blocks: int, max_tokens: int | None,
               data_dir: str | Path | None = None) -> list[torch.Tensor]:
    """``blocks`` disjoint slices of the validation prefix, each a whole number of sequences.

    Slice ``b`` holds targets ``b*n+1 .. (b+1)*n`` plus the one token before them, so the blocks
    together score each target once, as one pass over the first ``blocks*n`` targets would.
    """
    if blocks < 2:
        raise LmkitError(f"--blocks must be at least 2 (a spread needs two blocks), got {blocks}")
    val = load_val_tokens(open_data(Path(data_dir or run.meta["data"]["dir"]),
                                    run.tokenizer_path), max_tokens)
    seq = run.config.train.seq_len
    per = (val.numel() - 1) // blocks // seq * seq
    if per < seq:
        raise LmkitError(f"{val.numel() - 1:,} validation targets cannot make {blocks} blocks of "
                         f"at least one {seq}-token sequence; raise --max-tokens or lower --blocks")
    return [val[b * per:(b + 1) * per + 1] for b in range(blocks)]


def block_bits(run: runs.Run, model: torch.nn.Module, blocks: list[torch.Tensor],
               **eval_kwargs: Any) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Score each block with the run's validation metric: (first block's metric, bits, bytes).

    Block ``b`` is scored with seed ``train.seed + b`` whatever the model, so Monte-Carlo metrics
    draw the same masks and times for the checkpoint and every round trip (paired differences).
    """
    bits, nbytes, first = [], [], None
    for b, block in enumerate(blocks):
        metric = evaluate_loaded(run, model=model, val_tokens=block, purpose="validation",
                                 seed=run.config.train.seed + b, **eval_kwargs)["metrics"][0]
        first = first or metric
        bits.append(metric["value"] * metric["bytes"])
        nbytes.append(metric["bytes"])
    return first, np.array(bits), np.array(nbytes, dtype=np.float64)


def paired_difference(after: np.ndarray, before: np.ndarray,
                      nbytes: np.ndarray) -> tuple[float, float]:
    """(Σ after − Σ before) / Σ bytes over blocks, and its standard error across blocks.

    The ratio estimator's stderr, ``sqrt(B/(B-1) Σ (d_b − R y_b)^2) / Σ y_b``: how much the
    difference would move on other text of the same kind (blocks as independent samples).
    """
    d = after - before
    ratio = float(d.sum() / nbytes.sum())
    resid = d - ratio * nbytes
    n = len(d)
    return ratio, float(math.sqrt(n / (n - 1) * float((resid ** 2).sum())) / nbytes.sum())


def bench_pack(
    run_dirs: list[Path],
    *,
    device: str = "auto",
    max_tokens: int | None = None,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    bits: tuple[int, ...] = (6,),
    dtype: str = "fp32",
    blocks: int = 8,
    log: Log = None,
) -> dict[str, Any]:
    """Round-trip penalty (post − pre) and artifact bytes per recipe and run, with stderrs.

    Each run is scored with its validation metric (``nll`` for ar, a 2-sample ``nelbo_mc`` for the
    masked objectives) on ``blocks`` disjoint blocks of the validation prefix; penalties and the
    GPTQ − RTN differences are paired per block, so their stderr is the spread across text, not
    the noise of either score. ``dtype="fp32"``: bf16 rounding of activations moves a score by
    ~5e-5 bpb, as much as an int6 round trip of a small model. No pruning (the bytes are each
    recipe's own); artifacts go to a temporary directory.
    """
    if not run_dirs:
        raise LmkitError("lmkit bench pack needs at least one RUN directory")
    recipes = bench_recipes(bits)
    dev = resolve_device(device)
    rows_by_run = []
    with tempfile.TemporaryDirectory(prefix="lmkit-bench-pack-") as tmp:
        for i, run_dir in enumerate(run_dirs):
            run = runs.load_run(run_dir, dev)
            chunks = val_blocks(run, blocks, max_tokens)
            metric, before, nbytes = block_bits(run, run.model, chunks, dtype=dtype)
            entry = {"run": str(run.path), "objective": run.config.objective,
                     "params": run.meta["model"]["params"], "metric": metric["name"],
                     "kind": metric["kind"], "unit": metric["unit"],
                     "targets": int(sum(c.numel() - 1 for c in chunks)),
                     "bytes": int(nbytes.sum()), "before": float(before.sum() / nbytes.sum()),
                     "rows": [], "gptq_vs_rtn": []}
            after_by_recipe = {}
            for label, b, method, compression in recipes:
                path = Path(tmp) / f"{i}-{artifact_name(b, method, compression)}"
                facts = quantize_and_write(run, path, bits=b, method=method,
                                           compression=compression, cap_bytes=None,
                                           calib_tokens=calib_tokens)
                t0 = time.perf_counter()
                model, _ = load_artifact(path, dev)
                _, after, _ = block_bits(run, model, chunks, dtype=dtype)
                after_by_recipe[(b, method)] = after
                pen, se = paired_difference(after, before, nbytes)
                entry["rows"].append({
                    "recipe": label, "bits": b, "method": method, "compression": compression,
                    "artifact_bytes": facts["artifact_bytes"],
                    "after": float(after.sum() / nbytes.sum()), "penalty": pen,
                    "penalty_stderr": se,
                    "seconds": round(facts["quantize_seconds"] + time.perf_counter() - t0, 3),
                })
                if log:
                    log(f"{run.path.name} · {label}: {facts['artifact_bytes']:,} bytes, "
                        f"penalty {pen:+.5f} ± {se:.5f} {metric['unit']}")
                path.unlink(missing_ok=True)
            for b in bits:
                diff, se = paired_difference(after_by_recipe[(b, "gptq")],
                                             after_by_recipe[(b, "rtn")], nbytes)
                entry["gptq_vs_rtn"].append({
                    "bits": b, "gptq_minus_rtn": diff, "stderr": se, "gptq_beats_rtn": diff < 0,
                    "resolved": abs(diff) > 2 * se})
            rows_by_run.append(entry)
    return {"benchmark": "pack", "device": str(dev), "threads": torch.get_num_threads(),
            "precision": dtype, "max_tokens": max_tokens, "blocks": blocks,
            "calib_tokens": calib_tokens, "bits": list(bits), "runs": rows_by_run}
