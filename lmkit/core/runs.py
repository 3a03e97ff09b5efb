"""The one run-directory layout, and loading a run back from it.

::

    RUN/
      config.toml        resolved config; `lmkit train --config RUN/config.toml` re-runs it
      run.json           environment (versions, device, git SHA, plugins), data, model, tokens
      tokenizer.model    copy of the tokenizer the run was trained with
      metrics.jsonl      one JSON record per log step and per validation
      checkpoint/        model.safetensors, optim.safetensors, state.json (+ ema.safetensors)
      val.bin            the validation stream, when small (so evaluation needs only the run)
      eval.json          the latest `lmkit eval` result
      evals/             every evaluation, one file per protocol (see lmkit.core.evalstore)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import platform
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmkit import __version__
from lmkit.core import atomic, jsonfile
from lmkit.core import config as config_mod
from lmkit.core.build import Setup, build
from lmkit.core.checkpoint import (
    CHECKPOINT_DIR,
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    find_checkpoint,
    load_model_weights,
    read_ema,
    read_state,
)
from lmkit.core.data import (
    DataSource,
    load_stream,
    load_val_tokens,
    open_data,
    read_shard_header,
    write_shard,
)
from lmkit.core.ema import load_ema_into
from lmkit.core.tokenizer import Tokenizer
from lmkit.errors import LmkitError
from lmkit.protocols import TokenSpec

RUN_FILE = "run.json"
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
TOKENIZER_FILE = "tokenizer.model"
VAL_FILE = "val.bin"  # the run's own copy of the validation stream (a one-file shard)
RUN_VAL_MAX_TOKENS = 8_000_000  # copied when at most this many tokens (16 MB); else recorded


def default_run_dir(objective: str, preset: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{objective}-{preset}-{stamp}"


def git_sha() -> str | None:
    """The SHA of the lmkit checkout, when lmkit runs from one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    from lmkit.core.registry import get_registry

    registry = get_registry()
    env: dict[str, Any] = {
        "lmkit": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "git_sha": git_sha(),
        "argv": sys.argv,
        "plugins": [
            {"name": p.name, "distribution": p.distribution, "version": p.version}
            for p in registry.plugins.values()
        ],
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


class MetricsLog:
    """Append-only JSONL: the machine-readable half of the one logging path.

    A crash (or a full disk) can tear the last line; readers drop a torn tail with a
    :class:`~lmkit.core.atomic.RecoveryWarning` instead of failing, and a write that hits a full
    disk is undone and reported as one error. Each record written is then handed to the run's
    ``loggers`` (:mod:`lmkit.core.loggers`: trackers selected with ``train.log``), so they see
    exactly what this file holds.
    """

    def __init__(self, path: Path, loggers: Any = None):
        self.path = Path(path)
        self.loggers = loggers

    def write(self, record: dict[str, Any]) -> None:
        line = jsonfile.dumps(record) + "\n"
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "a") as fh:
                fh.write(line)
                fh.flush()
        except OSError as exc:
            if not atomic.is_disk_full(exc):
                raise
            try:
                os.truncate(self.path, size)  # no torn line left behind
            except OSError:
                pass
            raise atomic.disk_full_error(self.path, len(line)) from None
        if self.loggers is not None:
            self.loggers.log(line)

    def records(self) -> list[dict[str, Any]]:
        """Every record; a torn last line is dropped with a warning, other damage (a line that
        is not UTF-8, not JSON or not an object, followed by more records) is an error."""
        if not self.path.exists():
            return []
        lines = self.path.read_bytes().split(b"\n")
        while lines and not lines[-1].strip():
            lines.pop()
        out: list[dict[str, Any]] = []
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            where = f"{self.path} line {i + 1}"
            try:
                record = jsonfile.loads(raw, where)
                if not isinstance(record, dict):
                    raise LmkitError(f"{where} is not a JSON object")
            except LmkitError:
                if i == len(lines) - 1:
                    warnings.warn(f"lmkit: {self.path}: dropped a torn last line (line {i + 1}, "
                                  f"{len(raw)} bytes), left by a crash or a full disk",
                                  atomic.RecoveryWarning, stacklevel=2)
                    break
                raise LmkitError(f"{where} is corrupt (not a UTF-8 JSON object); delete that line "
                                 "to use the rest of the log") from None
            out.append(record)
        return out

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint so the log matches the weights."""
        if not self.path.exists():
            return
        keep = [r for r in self.records() if r.get("step", 0) <= step]
        atomic.write_text(self.path, "".join(jsonfile.dumps(r) + "\n" for r in keep))

    def reset(self) -> None:
        """A run restarted from step 0 starts a new log."""
        self.path.unlink(missing_ok=True)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (objects, one a line): a torn last line is dropped with
    a warning, other damage is one LmkitError."""
    return MetricsLog(Path(run_dir) / METRICS_FILE).records()


def read_run_meta(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/run.json``, checked to hold every key lmkit reads from it (with its type)."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    meta = jsonfile.read_json(path, f"{run_dir} is not an lmkit run directory ({RUN_FILE} is "
                                    "missing)")
    check_run_meta(meta, str(path))
    return meta


def check_run_meta(meta: dict[str, Any], where: str) -> None:
    """Every key lmkit reads from a run's metadata, with its type and range (``run.json``, or
    the same record inside an export's ``config.json``)."""
    req = jsonfile.require
    req(meta, "objective", str, where)
    req(meta, "config", dict, where)
    model = req(meta, "model", dict, where)
    req(model, "config", dict, f"{where} [model]")
    params = req(model, "params", int, f"{where} [model]")
    tokens = req(meta, "tokens", dict, where)
    vocab = req(tokens, "vocab_size", int, f"{where} [tokens]")
    bos = req(tokens, "bos_id", int, f"{where} [tokens]")
    special = req(tokens, "special", dict, f"{where} [tokens]")
    if not 1 <= vocab <= config_mod.MAX_VOCAB or not 0 <= bos < vocab or params < 0:
        raise LmkitError(f"{where}: tokens/params out of range (vocab_size {vocab}, bos_id "
                         f"{bos}, params {params}); it is damaged: restore or re-create it")
    if len(special) > 64 or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            and vocab <= v < vocab + 64 for k, v in special.items()):
        raise LmkitError(f"{where}: [tokens] special must map names to the ids after the "
                         "vocabulary; it is damaged: restore or re-create it")
    data = req(meta, "data", dict, where)
    req(data, "dir", str, f"{where} [data]")
    tok = req(data, "tokenizer", dict, f"{where} [data]")
    req(tok, "sha256", str, f"{where} [data.tokenizer]")


def read_run_state(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/checkpoint/state.json``, checked to hold the step, tokens and seconds lmkit reads."""
    run_dir = Path(run_dir)
    state = read_state(run_dir)  # the newest complete checkpoint, after a crash too
    path = (find_checkpoint(run_dir) or run_dir / CHECKPOINT_DIR) / STATE_FILE
    check_run_state(state, str(path))
    return state


def check_run_state(state: dict[str, Any], where: str) -> None:
    """The checkpoint's step, tokens and seconds, as lmkit reads them (``state.json``, or the
    ``checkpoint`` record of an export's ``config.json``)."""
    for key in ("step", "tokens"):
        value = jsonfile.require(state, key, int, where)
        if value < 0:
            raise LmkitError(f"{where}: {key} is negative; it is damaged")
    seconds = jsonfile.require(state, "seconds", (int, float), where)
    if not math.isfinite(seconds) or seconds < 0:
        raise LmkitError(f"{where}: seconds is {seconds!r}; it is damaged")


@dataclass(kw_only=True)
class Run(Setup):
    """A trained run loaded back from its directory (see :func:`load_run`): its built objective
    and model (a :class:`~lmkit.core.build.Setup`) plus what the directory records."""

    path: Path
    meta: dict[str, Any]
    state: dict[str, Any]
    export: dict[str, Any] | None = None  # an export folder's config.json (see core.export)
    weights: str = "raw"  # "ema": the model holds the checkpoint's weight average (train.ema)

    @property
    def tokenizer_path(self) -> Path:
        return self.tokenizer.path

    @property
    def data_dir(self) -> Path:
        """The data directory the run was trained on (as recorded, absolute)."""
        return Path(self.meta["data"]["dir"])

    def open_data(self, data_dir: str | Path | None = None) -> DataSource:
        """The run's data (or ``data_dir``, if it moved), checked against the run's tokenizer."""
        if self.data is None or data_dir is not None:
            where = Path(data_dir) if data_dir is not None else self.data_dir
            if data_dir is None and not where.is_dir():
                raise LmkitError(
                    f"run {self.path} was trained on {where}, which no longer exists; pass "
                    "--data DIR (shards made with the run's tokenizer, sha256 "
                    f"{self.tokenizer.sha256[:12]}...)")
            self.data = open_data(where, self.tokenizer)
        return self.data

    def _own_val(self, data_dir: str | Path | None) -> Path | None:
        own = self.path / VAL_FILE
        return own if data_dir is None and own.is_file() else None

    def val_tokens(self, max_tokens: int | None = None,
                   data_dir: str | Path | None = None) -> torch.Tensor:
        """Validation tokens: from ``data_dir`` if given, else the run's own copy
        (``RUN/val.bin``, so evaluation needs nothing outside the run), else its data."""
        own = self._own_val(data_dir)
        if own is not None:
            return load_stream([own], self.tokens.vocab_size, max_tokens)
        return load_val_tokens(self.open_data(data_dir), max_tokens)

    def val_origin(self, data_dir: str | Path | None = None) -> str:
        """Where :meth:`val_tokens` reads from (recorded with every evaluation)."""
        own = self._own_val(data_dir)
        return str((own or Path(data_dir or self.data_dir)).resolve())


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild objective and model from a run directory and load its latest checkpoint; or
    from an export folder (``lmkit export``: ``config.json`` + ``model.safetensors``), which
    holds the same records and loads to the same model."""
    from lmkit.core import export

    run_dir = Path(path)
    if not run_dir.is_dir():
        raise LmkitError(f"run directory {run_dir} does not exist")
    exported = None
    if not (run_dir / RUN_FILE).is_file() and export.is_export_dir(run_dir):
        exported = export.read_export_config(run_dir)
        meta, state = export.run_records(exported)
        where, weights = str(run_dir / export.CONFIG_FILE), run_dir / export.WEIGHTS_FILE
        ckpt: Path | None = run_dir
    else:
        meta = read_run_meta(run_dir)
        where = str(run_dir / RUN_FILE)
        state = read_run_state(run_dir)
        ckpt = find_checkpoint(run_dir)
        weights = (ckpt or run_dir / CHECKPOINT_DIR) / MODEL_FILE
    cfg = config_mod.from_dict(meta["config"], where)
    model_cfg = config_mod.model_config_from_dict(meta["model"]["config"], where)
    tokens = TokenSpec(**meta["tokens"])
    # Names and shapes of the stored weights must be the model's before anything is allocated.
    check_weights_file(weights, model_cfg, tokens.vocab_size, len(tokens.special))
    kind = "run" if exported is None else "export"
    tokenizer = Tokenizer.load(run_dir / TOKENIZER_FILE, f"the {kind}'s tokenizer copy")
    if tokenizer.vocab_size != tokens.vocab_size:
        raise LmkitError(f"{run_dir}: the tokenizer copy has {tokenizer.vocab_size} ids, "
                         f"{Path(where).name} records {tokens.vocab_size}; the {kind} is damaged")
    if exported is not None:
        export.check_tokenizer(run_dir, tokenizer.sha256, meta)
    setup = build(cfg, tokenizer=tokenizer, tokens=tokens, model_cfg=model_cfg, device=device)
    load_model_weights(run_dir, setup.model, ckpt)
    check_finite(setup.model, weights)
    kind = "raw"
    if cfg.train.ema > 0 and exported is not None:
        kind = "ema"  # an export holds the weights load_run gave it: the average
    elif cfg.train.ema > 0:  # the run kept an average of its weights: it is what is scored
        average = read_ema(run_dir)
        if average is None:
            raise LmkitError(f"{run_dir}: trained with train.ema={cfg.train.ema} but its "
                             f"checkpoint holds no {EMA_FILE}; the checkpoint is damaged")
        load_ema_into(setup.model, average, str(weights.parent / EMA_FILE))
        kind = "ema"
    setup.model.eval()
    fields = {f.name: getattr(setup, f.name) for f in dataclasses.fields(Setup)}
    return Run(**fields, path=run_dir, meta=meta, state=state, export=exported,
               weights=kind)


def check_weights_file(path: Path, model_cfg: Any, vocab_size: int, n_special: int) -> None:
    """Compare the safetensors header of ``path`` (read without loading a tensor) with the
    trunk ``model_cfg`` describes: every trunk weight present with its shape, nothing else
    but objective modules. So a damaged run.json cannot make lmkit allocate a huge model."""
    from safetensors import safe_open

    from lmkit.core.build import compare_shapes, trunk_shapes

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except FileNotFoundError:
        raise LmkitError(f"{path} is missing") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for damage
        raise LmkitError(f"{path} is corrupt: {str(exc)[:200]}") from None
    compare_shapes(stored, trunk_shapes(model_cfg, vocab_size, n_special), str(path))


def check_finite(model: torch.nn.Module, where: str | Path) -> None:
    """Every floating-point weight is finite: NaN/inf weights are a diverged or damaged run."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LmkitError(f"{where}: weight {name} holds NaN or infinite values (the run "
                             "diverged or the file is damaged); retrain with a lower learning "
                             "rate or restore the file")


def write_val_copy(run_dir: Path, data: DataSource) -> bool:
    """Copy the validation stream into the run when it is small (``RUN_VAL_MAX_TOKENS``), so the
    run is evaluated from its own files even after the data directory moves."""
    total = sum(read_shard_header(p) for p in data.val_shards)
    if total > RUN_VAL_MAX_TOKENS:
        return False
    write_shard(run_dir / VAL_FILE, load_val_tokens(data).numpy())
    return True


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run has a checkpoint (also one that an interrupted save left to recover)."""
    return find_checkpoint(run_dir) is not None


def has_run_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run config (it may have stopped before its first checkpoint)."""
    return (Path(run_dir) / CONFIG_FILE).is_file()


def model_meta(model_cfg: Any, model: torch.nn.Module) -> dict[str, Any]:
    from lmkit.core.trunk import count_params

    return {
        "config": dataclasses.asdict(model_cfg),
        "params": count_params(model),
        "padded_vocab": getattr(model, "padded_vocab", None),
    }
