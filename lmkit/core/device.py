"""Device and precision selection, so the same command runs on a laptop CPU and an H100."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from lmkit.errors import LmkitError

DEVICE_TYPES = ("cpu", "cuda", "mps")  # where lmkit can hold real tensors (never meta)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The device ``--device`` names; anything that cannot hold a model's tensors is an error."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise LmkitError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES or (device.index is not None and device.index > 255):
        raise LmkitError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LmkitError(f"--device {name}: MPS is not available here; use --device cpu")
    if device.type == "cpu" and device.index not in (None, 0):
        raise LmkitError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmkitError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise LmkitError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX; Linux /proc/cpuinfo flags).

    Without them bf16 autocast is emulated and far slower than fp32 (0.05x on an AVX2 AMD EPYC,
    `lmkit bench train`; lmkit's trunk 0.5x, its GEMMs in float32, see kernels.linear).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def cpu_emulates_bf16(device: torch.device) -> bool:
    """``device`` is a CPU without bf16 instructions: bf16 there is PyTorch's emulation."""
    return device.type == "cpu" and not cpu_has_native_bf16()


def resolve_dtype(name: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on a GPU that supports it, fp32 on every CPU.

    fp32 on a CPU keeps a run's figures independent of which CPU computed them. It is the
    faster choice only without bf16 instructions (AVX2: bf16 0.05x for the references, 0.46x
    for the trunk); with them bf16 won (AVX-512-BF16 EPYC: 1.41-1.96x for the references,
    1.58-1.82x for the trunk, 1.79-1.90x compiled, with
    :func:`~lmkit.core.kernels.causal_attention`),
    and ``--set train.dtype=bf16`` asks for it; ``lmkit bench train`` reports
    ``bf16_over_fp32`` for your CPU.
    """
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return name


def autocast(device: torch.device, dtype: str) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of autocast contexts (fp32: a no-op context)."""
    if dtype == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def compiler_missing(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device`` here, or None when it can:
    inductor needs a C++ compiler for the CPU and Triton for CUDA."""
    import importlib.util
    import shutil

    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed"
    if device.type == "cpu":
        found = any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
        return None if found else "no C++ compiler (g++, c++ or clang++) is on PATH"
    return f"lmkit does not compile for {device.type}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``: on CUDA through pinned memory with a non-blocking copy (the
    copy overlaps the previous step's kernels), elsewhere a plain move (a no-op on the CPU)."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)
