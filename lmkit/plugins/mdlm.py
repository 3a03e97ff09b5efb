"""The built-in plugin that registers masked diffusion on the continuous-time NELBO (``mdlm``).

It only registers: the code lives in :mod:`lmkit.builtin.mdlm`, imported when the hook
runs, so loading plugins (``lmkit --help``, ``--version``) never imports torch. A third-party
plugin can keep its entry-point module light the same way.
"""

from __future__ import annotations

from lmkit import hookimpl
from lmkit.plugins import forward_to


@hookimpl
def register_objectives(register):
    from lmkit.builtin.mdlm import MDLMObjective

    register(MDLMObjective)


__getattr__ = forward_to("lmkit.builtin.mdlm", __name__)  # the other names
