"""``lmkit bench pack``: what each quantization recipe costs, as paired round-trip penalties."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkit.core import runs
from lmkit.core.artifact import load_artifact
from lmkit.core.defaults import DEFAULT_CALIB_TOKENS
from lmkit.core.device import resolve_device
from lmkit.core.evaluate import evaluate_loaded
from lmkit.core.pack import Log, Recipe, quantize_and_write
from lmkit.errors import LmkitError


def bench_recipes(bits: tuple[int, ...] = (6,),
                  calib_tokens: int = DEFAULT_CALIB_TOKENS) -> list[tuple[str, Recipe]]:
    """(label, recipe): baseline int8/zlib, then rtn and gptq at each width, all uncapped."""
    recipes = [("int8/zlib", Recipe(8, "rtn", "zlib", None, calib_tokens))]
    for b in bits:
        recipes += [(f"int{b} {m}/lzma", Recipe(b, m, "lzma", None, calib_tokens))
                    for m in ("rtn", "gptq")]
    return recipes


def val_blocks(run: runs.Run, blocks: int, max_tokens: int | None,
               data_dir: str | Path | None = None) -> list[torch.Tensor]:
    """``blocks`` disjoint slices of the validation prefix, each a whole number of sequences.

    Slice ``b`` holds targets ``b*n+1 .. (b+1)*n`` plus the one token before them, so the blocks
    together score each target once, as one pass over the first ``blocks*n`` targets would.
    """
    if blocks < 2:
        raise LmkitError(f"--blocks must be at least 2 (a spread needs two blocks), got {blocks}")
    val = run.val_tokens(max_tokens, data_dir)
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
    recipes = bench_recipes(bits, calib_tokens)
    dev = resolve_device(device)
    rows_by_run = []
    with tempfile.TemporaryDirectory(prefix="lmkit-bench-pack-") as tmp:
        for i, run_dir in enumerate(run_dirs):
            run = runs.load_run(run_dir, dev)
            chunks = val_blocks(run, blocks, max_tokens)
            metric, before, nbytes = block_bits(run, run.model, chunks, dtype=dtype)
            entry = {"run": str(run.path.resolve()), "objective": run.config.objective,
                     "params": run.meta["model"]["params"], "metric": metric["name"],
                     "kind": metric["kind"], "unit": metric["unit"],
                     "targets": int(sum(c.numel() - 1 for c in chunks)),
                     "bytes": int(nbytes.sum()), "before": float(before.sum() / nbytes.sum()),
                     "rows": [], "gptq_vs_rtn": []}
            after_by_recipe = {}
            for label, recipe in recipes:
                b, method, compression = recipe.bits, recipe.method, recipe.compression
                path = Path(tmp) / f"{i}-{recipe.file_name}"
                facts = quantize_and_write(run, path, recipe)
                t0 = time.perf_counter()
                model, _ = load_artifact(path, dev, like=run.model)
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
