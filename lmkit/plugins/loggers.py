"""The built-in plugin that registers the optional loggers ``trackio``, ``tensorboard``, ``wandb``.

It only registers: the classes live in :mod:`lmkit.builtin.loggers`, and each imports its library
only when a run opens it (``lmkit train --log NAME``), so none of them is needed to use lmkit.
"""

from __future__ import annotations

from lmkit import hookimpl
from lmkit.plugins import forward_to


@hookimpl
def register_loggers(register):
    from lmkit.builtin.loggers import LOGGERS

    for cls in LOGGERS:
        register(cls)


__getattr__ = forward_to("lmkit.builtin.loggers", __name__)  # the other names
