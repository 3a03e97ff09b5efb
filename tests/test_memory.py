"""The process memory policy: with ``keep_freed_memory`` a training step's temporaries reuse
the pages freed by the step before instead of faulting them all in again."""

from __future__ import annotations

import mmap
import resource
import sys
from pathlib import Path

import pytest

from lmkit.core.memory import keep_freed_memory, peak_rss_bytes, release_memory


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_steps_reuse_freed_pages() -> None:
    from lmkit.core.build import batch_geometry, build
    from lmkit.core.config import resolve_config
    from lmkit.core.data import open_for_training
    from lmkit.core.optim import build_optimizers
    from lmkit.core.train import train_step

    assert keep_freed_memory()
    cfg = resolve_config(preset="small", flags={"objective": "ar", "train.steps": 10,
                                                "train.device": "cpu"})
    setup = build(cfg, open_for_training(cfg.data))
    optimizers = build_optimizers(setup.model, cfg.optim)
    micro, accum, _ = batch_geometry(cfg)
    loader = setup.loader(micro)
    setup.model.train()
    for step in range(2):  # the first steps grow the heap to the step's peak
        train_step(setup, setup.model, optimizers, loader, accum, step)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for step in range(2, 4):
        train_step(setup, setup.model, optimizers, loader, accum, step)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 2
    # glibc's default unmaps large freed blocks: 14,000-35,000 faults a step here; with the
    # blocks kept for reuse ~1,000
    assert faults < 8000
    release_memory()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux's /proc")
def test_peak_rss_is_the_kernels_high_water_mark() -> None:
    """``peak_rss_bytes`` (getrusage) against the kernel's VmHWM in /proc, before and after a
    buffer that lifts the resident set 64 MB above its old peak."""

    def status_bytes(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                    if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    before = peak_rss_bytes()
    assert abs(before - status_bytes("VmHWM")) <= 4 << 20
    lift = before - status_bytes("VmRSS") + (64 << 20)
    with mmap.mmap(-1, lift) as fresh:  # new pages (not the heap's freed ones), all written
        for offset in range(0, lift, mmap.PAGESIZE):
            fresh[offset] = 1
        assert peak_rss_bytes() >= before + (56 << 20)
        assert abs(peak_rss_bytes() - status_bytes("VmHWM")) <= 4 << 20
