"""Metric sinks beside ``metrics.jsonl``: the loggers a run selects, opened once, fed each record.

``metrics.jsonl`` (:class:`lmkit.core.runs.MetricsLog`) is the one logging path and stays
authoritative: it writes a record, then hands every logger selected with ``--log`` /
``train.log`` its own copy of that JSON line. Core knows no logger by name: each comes from the
registry (``register_loggers``), built-in or not. A logger that cannot open stops the run before
its first step (one LmkitError line); one that raises later is dropped for the rest of the run
with one warning line, and training goes on.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from lmkit.errors import LmkitError


class LoggerWarning(UserWarning):
    """A logger failed during a run and was dropped; metrics.jsonl has every record."""


def _detail(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def check_loggers(names: list[str]) -> list[Any]:
    """The registry entries of ``names``; an unknown name is one error listing the registered
    loggers (``lmkit loggers``)."""
    from lmkit.core.registry import get_logger

    if len(set(names)) != len(names):
        raise LmkitError(f"--log lists a logger twice: {','.join(names)}")
    return [get_logger(name) for name in names]


class Loggers:
    """The open loggers of one run: ``log`` fans a JSONL line out, ``close`` ends them all."""

    def __init__(self, opened: list[tuple[Any, Any]] | None = None) -> None:
        self._open = list(opened or [])  # (registry entry, logger instance)

    @property
    def names(self) -> list[str]:
        return [entry.name for entry, _ in self._open]

    def log(self, line: str) -> None:
        """Give each logger its own copy of the record ``line`` (as written to metrics.jsonl)."""
        for item in list(self._open):
            entry, logger = item
            try:
                logger.log(json.loads(line))
            except Exception as exc:  # noqa: BLE001 - a tracker's failure must not end the run
                self._open.remove(item)
                warnings.warn(f"lmkit: logger {entry.name!r} ({entry.distribution}) failed and "
                              f"was dropped; metrics.jsonl has every record: {_detail(exc)}",
                              LoggerWarning, stacklevel=3)
                self._close(entry, logger)

    def close(self) -> None:
        while self._open:
            self._close(*self._open.pop(0))

    @staticmethod
    def _close(entry: Any, logger: Any) -> None:
        try:
            logger.close()
        except Exception as exc:  # noqa: BLE001 - the run's own files are already safe
            warnings.warn(f"lmkit: logger {entry.name!r} ({entry.distribution}) failed to "
                          f"close: {_detail(exc)}", LoggerWarning, stacklevel=3)

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_loggers(names: list[str], run_dir: Path, config: dict[str, Any],
                 resumed_at: int | None = None) -> Loggers:
    """Open the loggers ``names`` for the run in ``run_dir`` (before its first step); if one
    fails to open, those already open are closed and the failure is one LmkitError."""
    from lmkit.protocols import LoggerContext

    ctx = LoggerContext(run_dir=Path(run_dir), config=config, resumed_at=resumed_at)
    loggers = Loggers()
    for entry in check_loggers(list(names)):
        try:
            loggers._open.append((entry, entry.obj(ctx)))
        except BaseException as exc:
            loggers.close()
            if isinstance(exc, LmkitError) or not isinstance(exc, Exception):
                raise
            raise LmkitError(f"logger {entry.name!r} (plugin {entry.plugin!r}, "
                             f"{entry.distribution} {entry.version}) failed to open: "
                             f"{_detail(exc)}") from exc
    return loggers


def open_run_loggers(cfg: Any, run_dir: Path, resume: bool) -> Loggers:
    """The loggers ``cfg.train.log`` selects, opened with the resolved config (as ``run.json``
    stores it) and, on resume, the checkpoint's step."""
    from lmkit.core import config as config_mod
    from lmkit.core.runs import read_run_state

    resumed_at = read_run_state(run_dir)["step"] if resume and cfg.train.log else None
    return open_loggers(cfg.train.log, run_dir, config_mod.to_dict(cfg), resumed_at)
