"""The built-in plugin that registers multi-token prediction (``mtp``).

It only registers: the code lives in :mod:`lmkit.builtin.mtp`, imported when the hook
runs, so loading plugins (``lmkit --help``, ``--version``) never imports torch.
"""

from __future__ import annotations

from typing import Any

from lmkit import hookimpl


@hookimpl
def register_objectives(register):
    from lmkit.builtin.mtp import MTPObjective

    register(MTPObjective)


def __getattr__(name: str) -> Any:  # `from lmkit.plugins.mtp import X` works
    import lmkit.builtin.mtp as impl

    try:
        return getattr(impl, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
