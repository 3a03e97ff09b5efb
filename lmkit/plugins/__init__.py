"""lmkit's built-in plugins: light hook modules, registered like any third-party plugin.

Each registers its objectives or samplers from :mod:`lmkit.builtin`, imported only when the hook
runs, so loading plugins costs nothing heavy (``lmkit --help`` never imports torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def forward_to(module: str, plugin: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``plugin`` that finds its other names in ``module``, so
    ``from lmkit.plugins.ar import ARObjective`` keeps working (importing it on first use)."""

    def __getattr__(name: str) -> Any:
        try:
            return getattr(importlib.import_module(module), name)
        except AttributeError:
            raise AttributeError(f"module {plugin!r} has no attribute {name!r}") from None

    return __getattr__
