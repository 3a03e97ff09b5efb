"""The built-in plugin that registers masked diffusion on the continuous-time NELBO (``mdlm``).

It only registers: the code lives in :mod:`lmkit.builtin.mdlm`, imported when the hook
runs, so loading plugins (``lmkit --help``, ``--version``) never imports torch. A third-party
plugin can keep its entry-point module light the same way.
"""

from __future__ import annotations

from typing import Any

from lmkit import hookimpl


@hookimpl
def register_objectives(register):
    from lmkit.builtin.mdlm import MDLMObjective

    register(MDLMObjective)


def __getattr__(name: str) -> Any:  # `from lmkit.plugins.mdlm import X` keeps working
    import lmkit.builtin.mdlm as impl

    try:
        return getattr(impl, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
