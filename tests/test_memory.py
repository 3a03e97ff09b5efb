"""The process memory policy: with ``keep_freed_memory`` a training step's temporaries reuse
the pages freed by the step before instead of faulting them all in again."""

from __future__ import annotations

import resource
import sys

import pytest

from lmkit.core.memory import keep_freed_memory, release_memory


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
