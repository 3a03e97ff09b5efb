"""The built-in plugin that registers multi-token prediction (``mtp``).

It only registers: the code lives in :mod:`lmkit.builtin.mtp`, imported when the hook
runs, so loading plugins (``lmkit --help``, ``--version``) never imports torch.
"""

from __future__ import annotations

from lmkit import hookimpl
from lmkit.plugins import forward_to


@hookimpl
def register_objectives(register):
    from lmkit.builtin.mtp import MTPObjective

    register(MTPObjective)


__getattr__ = forward_to("lmkit.builtin.mtp", __name__)  # the other names
