"""The lmkit hook specifications: everything a plugin can add.

Each hook receives a ``register`` callback (or the click group) and calls it once per thing it
adds; the host attaches the plugin's name and version and rejects duplicate names. Hooks are only
ever added, never renamed, and their arguments are never removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("lmkit")
hookimpl = pluggy.HookimplMarker("lmkit")


@hookspec
def register_objectives(register: Callable[[Any], None]) -> None:
    """Register training objectives: ``register(ObjectiveClass)``.

    The class needs ``name`` and ``description`` attributes and follows
    :class:`lmkit.protocols.Objective`; it is instantiated once per run.
    """


@hookspec
def register_samplers(register: Callable[[Any], None]) -> None:
    """Register samplers: ``register(SamplerClass)`` following :class:`lmkit.protocols.Sampler`."""


@hookspec
def register_corpora(register: Callable[[Any], None]) -> None:
    """Register named text corpora for ``lmkit data prepare --corpus NAME``: ``register(corpus)``.

    A corpus has ``name``, ``description`` and ``documents()`` yielding strings in a fixed order.
    """


@hookspec
def register_loggers(register: Callable[[Any], None]) -> None:
    """Register metric sinks for ``lmkit train --log NAME``: ``register(LoggerClass)``.

    The class has ``name`` and ``description``, is instantiated as ``cls(ctx)`` with a
    :class:`lmkit.protocols.LoggerContext` and follows :class:`lmkit.protocols.Logger`
    (``log(record)`` with every ``metrics.jsonl`` record, then ``close()``).
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add click commands to the ``lmkit`` CLI group: ``@cli.command() def mine(): ...``."""
