"""lmkit-uniform: uniform-noise discrete diffusion for lmkit, packaged as a third-party plugin.

Installing this package registers, through the ``lmkit`` entry point group:

* objective ``uniform`` — D3PM/UDLM-style diffusion where noise replaces tokens by uniformly
  random ids, scored by the T-step negative ELBO (``kind: upper_bound``, with its stderr);
* sampler ``uniform_ancestral`` — ancestral sampling of its reverse chain.

It uses only lmkit's public API (``lmkit.hookimpl`` and the names exported by ``lmkit``).
"""

from lmkit import hookimpl

from lmkit_uniform.diffusion import UniformAncestral, UniformDiffusion

__version__ = "0.1.0"
__all__ = ["UniformAncestral", "UniformDiffusion", "register_objectives", "register_samplers"]


@hookimpl
def register_objectives(register):
    register(UniformDiffusion)


@hookimpl
def register_samplers(register):
    register(UniformAncestral)
