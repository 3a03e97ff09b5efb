"""The built-in plugin that registers the samplers ``ar``, ``ddpm``, ``ddpm_cache``, ``confidence``.

It only registers: the code lives in :mod:`lmkit.builtin.samplers`, imported when the hook
runs, so loading plugins (``lmkit --help``, ``--version``) never imports torch. A third-party
plugin can keep its entry-point module light the same way.
"""

from __future__ import annotations

from typing import Any

from lmkit import hookimpl


@hookimpl
def register_samplers(register):
    from lmkit.builtin.samplers import ARSampler, ConfidenceSampler, DDPMCacheSampler, DDPMSampler

    register(ARSampler)
    register(DDPMSampler)
    register(DDPMCacheSampler)
    register(ConfidenceSampler)


def __getattr__(name: str) -> Any:  # `from lmkit.plugins.samplers import X` keeps working
    import lmkit.builtin.samplers as impl

    try:
        return getattr(impl, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
