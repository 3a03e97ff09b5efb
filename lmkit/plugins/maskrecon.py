"""The built-in plugin that registers PR #1596's fixed-t masked reconstruction (``maskrecon``).

It only registers: the code lives in :mod:`lmkit.builtin.maskrecon`, imported when the hook
runs, so loading plugins (``lmkit --help``, ``--version``) never imports torch. A third-party
plugin can keep its entry-point module light the same way.
"""

from __future__ import annotations

from typing import Any

from lmkit import hookimpl


@hookimpl
def register_objectives(register):
    from lmkit.builtin.maskrecon import MaskReconObjective

    register(MaskReconObjective)


def __getattr__(name: str) -> Any:  # `from lmkit.plugins.maskrecon import X` keeps working
    import lmkit.builtin.maskrecon as impl

    try:
        return getattr(impl, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
