"""The built-in plugin that registers the samplers ``ar``, ``ddpm``, ``ddpm_cache``, ``confidence``,
``entropy_bounded`` and ``block``.

It only registers: the code lives in :mod:`lmkit.builtin.samplers` and
:mod:`lmkit.builtin.unmasking`, imported when the hook runs, so loading plugins (``lmkit --help``,
``--version``) never imports torch. A third-party plugin can keep its entry-point module light the
same way.
"""

from __future__ import annotations

from lmkit import hookimpl
from lmkit.plugins import forward_to


@hookimpl
def register_samplers(register):
    from lmkit.builtin.samplers import ARSampler, ConfidenceSampler, DDPMCacheSampler, DDPMSampler
    from lmkit.builtin.unmasking import BlockSampler, EntropyBoundedSampler

    register(ARSampler)
    register(DDPMSampler)
    register(DDPMCacheSampler)
    register(ConfidenceSampler)
    register(EntropyBoundedSampler)
    register(BlockSampler)


__getattr__ = forward_to("lmkit.builtin.samplers", __name__)  # the other names
