"""lmkit-uniform: uniform-noise discrete diffusion for lmkit, packaged as a third-party plugin.

Installing this package registers, through the ``lmkit`` entry point group:

* objective ``uniform`` — D3PM/UDLM-style diffusion where noise replaces tokens by uniformly
  random ids, scored by the T-step negative ELBO (``kind: upper_bound``, with its stderr);
* sampler ``uniform_ancestral`` — ancestral sampling of its reverse chain.

It uses only lmkit's public API (``lmkit.hookimpl`` and the names exported by ``lmkit``). The
hooks import the implementation when they run, so installing the plugin does not slow down
commands that need no objective (``lmkit --help``, ``--version``).
"""

from typing import Any

from lmkit import hookimpl

__version__ = "0.1.0"
__all__ = ["UniformAncestral", "UniformDiffusion", "register_objectives", "register_samplers"]


@hookimpl
def register_objectives(register):
    from lmkit_uniform.diffusion import UniformDiffusion

    register(UniformDiffusion)


@hookimpl
def register_samplers(register):
    from lmkit_uniform.diffusion import UniformAncestral

    register(UniformAncestral)


def __getattr__(name: str) -> Any:  # `from lmkit_uniform import UniformDiffusion` still works
    if name in ("UniformAncestral", "UniformDiffusion"):
        from lmkit_uniform import diffusion

        return getattr(diffusion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
