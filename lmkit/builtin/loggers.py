"""The optional built-in loggers: trackio, TensorBoard and Weights & Biases, all offline-safe.

Each imports its library when a run opens it (so lmkit never needs them) and, when the library
is missing, stops the run before its first step with one line naming the extra to install.
They log the numbers of each ``metrics.jsonl`` record (see :func:`scalars`) at the record's
``step``, and the run config once:

* ``tensorboard``: event files in ``RUN/tensorboard/`` (``tensorboard --logdir RUN``);
* ``trackio``: local SQLite under ``TRACKIO_DIR`` (trackio's default: ``$HF_HOME/trackio``),
  project ``lmkit``, one run per run directory (``trackio show --project lmkit``); it never
  contacts the network (a ``TRACKIO_SPACE_ID`` / ``TRACKIO_SERVER_URL`` in the environment is
  refused: push afterwards with ``trackio sync``);
* ``wandb``: offline mode unless ``WANDB_MODE`` says otherwise, files in ``RUN/wandb/``
  (``wandb sync RUN/wandb/offline-run-*`` uploads them later).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lmkit.core import jsonfile
from lmkit.errors import LmkitError
from lmkit.protocols import LoggerContext

PROJECT = "lmkit"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one record as ``TYPE/key`` scalars, ``step`` excluded (it is the x axis).

    Top-level numbers (``train/loss``, ``train/tok_s``, ``val/tokens``, ...); numbers of a nested
    table under their own key (``train/<loss metric>``, or ``train/<table>/<key>`` when that is
    taken); each metric of a ``metrics`` list as ``val/<name>`` with ``val/<name>_stderr``.
    Missing values (null) are left out.
    """
    kind = str(record.get("type", "record"))
    out: dict[str, float] = {}
    nested: list[tuple[str, str, Any]] = []
    for key, value in record.items():
        if key in ("type", "step"):
            continue
        if _number(value):
            out[f"{kind}/{key}"] = float(value)
        elif isinstance(value, Mapping):
            nested += [(key, str(k), v) for k, v in value.items() if _number(v)]
        elif key == "metrics" and isinstance(value, list):
            for m in value:
                if isinstance(m, Mapping) and isinstance(m.get("name"), str):
                    if _number(m.get("value")):
                        nested.append(("metrics", m["name"], m["value"]))
                    if _number(m.get("stderr")):
                        nested.append(("metrics", f"{m['name']}_stderr", m["stderr"]))
    for table, key, value in nested:
        tag = f"{kind}/{key}"
        out[tag if tag not in out else f"{kind}/{table}/{key}"] = float(value)
    return out


def require(module: str, logger: str, extra: str) -> Any:
    """Import ``module`` for the logger ``logger``, or one error naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise LmkitError(f"--log {logger} needs {extra}, which is not installed: pip install "
                         f"'lmkit[{extra}]' ({type(exc).__name__}: {exc})") from None


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Libraries that print progress lines must not mix them into ``--json`` output."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


class TensorBoardLogger:
    """Event files under ``RUN/tensorboard/``, read by TensorBoard's own tools."""

    name = "tensorboard"
    description = "TensorBoard event files in RUN/tensorboard (pip install 'lmkit[tensorboard]')"

    def __init__(self, ctx: LoggerContext) -> None:
        require("tensorboard", self.name, "tensorboard")
        writer_mod = require("torch.utils.tensorboard", self.name, "tensorboard")
        # On resume, events past the checkpoint (re-logged now) are purged, as the JSONL is.
        purge = None if ctx.resumed_at is None else ctx.resumed_at + 1
        self.writer = writer_mod.SummaryWriter(log_dir=str(Path(ctx.run_dir) / "tensorboard"),
                                               purge_step=purge)
        if ctx.resumed_at is None:
            config = jsonfile.dumps(ctx.config, indent=2, sort_keys=True)
            self.writer.add_text("config", "```\n" + config + "\n```", global_step=0)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


def refuse_remote(environ: Mapping[str, str]) -> None:
    """trackio logs remotely when these are set; lmkit's trackio logger stays local."""
    remote = [k for k in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL") if environ.get(k)]
    if remote:
        raise LmkitError(f"--log trackio stays local, but {remote[0]} is set; unset it (and push "
                         "the local project afterwards with `trackio sync`)")


class TrackioLogger:
    """A local trackio run (SQLite under ``TRACKIO_DIR``), named after the run directory."""

    name = "trackio"
    description = ("trackio, local SQLite in TRACKIO_DIR, project lmkit "
                   "(pip install 'lmkit[trackio]')")

    def __init__(self, ctx: LoggerContext) -> None:
        refuse_remote(os.environ)
        trackio = require("trackio", self.name, "trackio")
        self.trackio = trackio
        self.run_name = str(ctx.run_dir)
        with _stdout_to_stderr():
            self.run = trackio.init(
                project=PROJECT, name=self.run_name, config=ctx.config,
                resume="never" if ctx.resumed_at is None else "allow", embed=False,
                auto_log_cpu=False, auto_log_gpu=False)

    def log(self, record: dict[str, Any]) -> None:
        with _stdout_to_stderr():
            self.run.log(scalars(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        with _stdout_to_stderr():
            self.trackio.finish()


WANDB_ID_FILE = Path("wandb") / "lmkit-run-id"


def wandb_run_id(ctx: LoggerContext) -> str:
    """The wandb run id of this lmkit run: new for a fresh run (kept in
    ``RUN/wandb/lmkit-run-id``), the kept one for a resumed run, so it continues its own."""
    from lmkit.core import atomic

    path = Path(ctx.run_dir) / WANDB_ID_FILE
    if ctx.resumed_at is not None and path.is_file():
        kept = path.read_text().strip()
        if kept.isalnum():
            return kept
    run_id = secrets.token_hex(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, run_id + "\n")
    return run_id


def wandb_settings(ctx: LoggerContext, environ: Mapping[str, str], run_id: str) -> dict[str, Any]:
    """``wandb.init`` arguments: offline unless ``WANDB_MODE`` is set (``WANDB_PROJECT``
    names the project, else ``lmkit``), files in the run directory, the run's own id."""
    return {"project": environ.get("WANDB_PROJECT") or PROJECT, "name": str(ctx.run_dir),
            "id": run_id, "dir": str(ctx.run_dir), "config": ctx.config,
            "mode": environ.get("WANDB_MODE") or "offline",
            "resume": "allow" if ctx.resumed_at is not None else None}


class WandbLogger:
    """Weights & Biases, offline by default (``WANDB_MODE=online`` to stream)."""

    name = "wandb"
    description = ("Weights & Biases, offline by default, files in RUN/wandb "
                   "(pip install 'lmkit[wandb]')")

    def __init__(self, ctx: LoggerContext) -> None:
        wandb = require("wandb", self.name, "wandb")
        with _stdout_to_stderr():
            self.run = wandb.init(**wandb_settings(ctx, os.environ, wandb_run_id(ctx)))

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        with _stdout_to_stderr():
            self.run.finish()


LOGGERS = (TrackioLogger, TensorBoardLogger, WandbLogger)
