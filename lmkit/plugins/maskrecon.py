"""The built-in plugin that registers PR #1596's fixed-t masked reconstruction (``maskrecon``).

It only registers: the code lives in :mod:`lmkit.builtin.maskrecon`, imported when the hook
runs, so loading plugins (``lmkit --help``, ``--version``) never imports torch. A third-party
plugin can keep its entry-point module light the same way.
"""

from __future__ import annotations

from lmkit import hookimpl
from lmkit.plugins import forward_to


@hookimpl
def register_objectives(register):
    from lmkit.builtin.maskrecon import MaskReconObjective

    register(MaskReconObjective)


__getattr__ = forward_to("lmkit.builtin.maskrecon", __name__)  # the other names
