"""Peak matmul throughput, measured on this machine, for MFU figures that mean something here."""

from __future__ import annotations

import time

import torch

from lmkit.core.device import synchronize

_PEAK_CACHE: dict[tuple[str, str], float] = {}


def measure_peak_flops(device: torch.device, dtype: str, seconds: float = 0.3) -> float:
    """Best observed FLOP/s of a square matmul in ``dtype`` ("bf16" or "fp32"); cached per process
    (see :func:`matmul_flops`)."""
    key = (str(device), dtype)
    if key not in _PEAK_CACHE:
        _PEAK_CACHE[key] = matmul_flops(device, dtype, seconds)
    return _PEAK_CACHE[key]


def matmul_flops(device: torch.device, dtype: str, seconds: float = 0.3) -> float:
    """One fresh measurement of the best square-matmul FLOP/s in ``dtype`` (never cached, so
    repeats show how much the figure drifts on a shared machine).

    The size is large enough to saturate the device (1024 on a CPU, 8192 on a GPU) and the best of
    the timed repetitions is kept, so the figure approaches what the hardware can do.
    """
    n = 8192 if device.type == "cuda" else 1024
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)  # never touch the training RNG
    a = torch.randn(n, n, device=device, dtype=torch_dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch_dtype, generator=gen)
    torch.matmul(a, b)  # warm up kernels / thread pools
    synchronize(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    reps = 0
    # at least one timed repetition, more until ``seconds`` are spent (a CPU that emulates bf16
    # takes seconds per product: one is all it gets)
    while reps < 1 or (time.perf_counter() < deadline and reps < 50):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2 * n**3 / best
