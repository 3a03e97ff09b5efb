"""``lmkit bench train``: training throughput, fp32 and bf16 side by side in one process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from lmkit.core.build import batch_geometry, build
from lmkit.core.config import resolve_config
from lmkit.core.data import open_for_training
from lmkit.core.device import synchronize
from lmkit.core.optim import build_optimizers
from lmkit.core.perf import measure_peak_flops
from lmkit.core.train import train_step
from lmkit.core.trunk import count_params, flops_per_token


def bench_train(
    *,
    preset: str = "small",
    objective: str = "ar",
    steps: int = 8,
    warmup: int = 2,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Training tokens/s and MFU for fp32 and bf16 autocast on the same data and model."""
    cfg = resolve_config(preset=preset, flags={"objective": objective, "train.device": device,
                                               "train.steps": steps})
    data = open_for_training(cfg.data, log)
    rows = []
    for precision in ("fp32", "bf16"):
        cfg.train.dtype = precision
        setup = build(cfg, data)
        optimizers = build_optimizers(setup.model, cfg.optim)
        micro, accum, tokens_per_step = batch_geometry(cfg)
        loader = setup.loader(micro)
        setup.model.train()
        device_used = str(setup.device)
        for i in range(warmup):
            train_step(setup, setup.model, optimizers, loader, accum, i)
        synchronize(setup.device)
        t0 = time.perf_counter()
        for i in range(steps):
            train_step(setup, setup.model, optimizers, loader, accum, warmup + i)
        synchronize(setup.device)
        seconds = time.perf_counter() - t0
        tok_s = steps * tokens_per_step / seconds
        n_params = count_params(setup.model)
        flops_tok = flops_per_token(setup.model.cfg, n_params, cfg.train.seq_len, data.vocab_size)
        peak = measure_peak_flops(setup.device, precision)
        rows.append({
            "precision": precision, "tok_s": tok_s, "step_seconds": seconds / steps,
            "tokens_per_step": tokens_per_step, "flops_per_token": flops_tok,
            "model_flops_s": flops_tok * tok_s, "peak_flops": peak,
            "mfu": flops_tok * tok_s / peak,
        })
        if log:
            log(f"{precision}: {tok_s:,.0f} tok/s, MFU {100 * rows[-1]['mfu']:.1f}%")
        del setup, optimizers, loader
    return {
        "benchmark": "train", "preset": preset, "objective": objective,
        "device": device_used,
        "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup,
        "params": n_params, "rows": rows,
        "bf16_over_fp32": rows[1]["tok_s"] / rows[0]["tok_s"],
        "mfu_note": "model FLOPs/s (6N + attention per token) over the best square-matmul FLOP/s "
                    "measured in this process at the same precision",
    }
