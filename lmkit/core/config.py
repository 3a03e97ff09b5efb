"""One config path: dataclass defaults < preset < ``--config`` TOML < CLI flags < ``--set k=v``.

The resolved config is written to every run directory as TOML and can be fed back with
``lmkit train --config RUN/config.toml`` to re-run it. Unknown keys are an error everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lmkit.core.config_values import (  # noqa: F401  (re-exported for the config's readers)
    DEVICE_RE,
    MAX_BATCH_TOKENS,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_MLP_MULT,
    MAX_PARAMS,
    MAX_SECONDS,
    MAX_SEED,
    MAX_SEQ_LEN,
    MAX_STEPS,
    MAX_VOCAB,
    MAX_WIDTH,
    check_data,
    check_model,
    check_optim,
    check_train,
    check_values,
    field_types,
    trunk_params,
)
from lmkit.core.optim import OptimConfig
from lmkit.core.presets import PRESETS
from lmkit.core.trunk import ModelConfig
from lmkit.core.units import parse_count
from lmkit.errors import LmkitError


@dataclass
class TrainConfig:
    """Budget, batch and bookkeeping of a training run."""

    steps: int = 0                # budgets: training stops at the first one reached (0 = unset)
    tokens: int = 0
    time: float = 0.0             # seconds of training (validation excluded)
    batch_tokens: int = 8192      # target tokens per optimizer step
    micro_batch: int = 0          # sequences per forward/backward (0 = the whole step at once)
    seq_len: int = 256
    warmup_steps: int = 0
    warmdown_frac: float = 0.2    # final fraction of the budget with LR decaying linearly to 0
    log_every: int = 10
    val_every: int = 0            # steps between validations (0 = only at the end)
    val_tokens: int = 32768       # validation-stream targets scored during training
    ckpt_every: int = 0           # steps between checkpoints (0 = only at the end)
    ckpt_seconds: float = 120.0   # also checkpoint this long (wall clock) after the last (0 = off)
    seed: int = 1337
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    dtype: str = "auto"           # auto (bf16 autocast on CUDA, fp32 on CPUs) | bf16 | fp32
    compile: bool = False         # training runs the blocks torch.compile-d (eager w/o compiler)
    prime_steps: int = 0          # untimed steps first (compilation), then weights etc. restored
    ema: float = 0.0              # decay of an fp32 EMA of the weights, used by eval/pack (0 = off)
    # metric sinks fed every metrics.jsonl record (registered loggers; see `lmkit loggers`)
    log: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    path: str = ""                # prepared shards ("" = the default corpus, prepared once)
    tokenizer: str = ""           # SentencePiece model ("" = the one in the data directory)
    group_size: int = 0           # training shards held in memory at once (0 = all)


@dataclass
class RunConfig:
    objective: str = "ar"
    preset: str = "small"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    options: dict[str, Any] = field(default_factory=dict)  # the objective's own, TOML [options]


SECTIONS = ("model", "optim", "train", "data")
BUDGET_KEYS = ("steps", "tokens", "time")



def _convert(value: Any, typ: Any, key: str) -> Any:
    """Coerce a TOML or command-line value to a dataclass field's type."""
    if isinstance(typ, str):
        typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ)
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            return parse_count(value)  # 1e6, 1_000_000, 1.5M, 2k on the command line
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
        if origin is list:  # a TOML array, or "a,b" on the command line
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError(value)
            return [i.strip() for i in items if i.strip()]
    except (TypeError, ValueError, OverflowError):
        raise LmkitError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    return value


def _unknown(key: str, known: list[str], where: str) -> LmkitError:
    close = difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in known], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return LmkitError(f"unknown config key {key!r} in {where}{hint}")


# Keys that moved: (section, key) -> where they live now. ``model.seq_len`` (the RoPE table size)
# was merged into ``train.seq_len``, the one sequence length; old configs still load.
MOVED_KEYS = {("model", "seq_len"): ("train", "seq_len")}


def apply_section(obj: Any, values: dict[str, Any], section: str, where: str,
                  cfg: RunConfig | None = None) -> None:
    types_ = field_types(obj)
    for key, value in values.items():
        moved = MOVED_KEYS.get((section, key))
        if moved is not None:
            if cfg is not None:  # a stored model config has no RunConfig: the key is dropped
                apply_section(getattr(cfg, moved[0]), {moved[1]: value}, moved[0], where)
            continue
        if key not in types_:
            raise _unknown(f"{section}.{key}", [f"{section}.{k}" for k in types_], where)
        setattr(obj, key, _convert(value, types_[key], f"{section}.{key}"))


def apply_mapping(cfg: RunConfig, data: dict[str, Any], where: str) -> None:
    """Apply a nested mapping (a TOML document or a preset) onto ``cfg``."""
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise LmkitError(f"{where}: [{key}] must be a table")
            apply_section(getattr(cfg, key), value, key, where, cfg)
        elif key == "options":
            if not isinstance(value, dict):
                raise LmkitError(f"{where}: [options] must be a table")
            cfg.options.update(value)
        elif key in ("objective", "preset"):
            setattr(cfg, key, str(value))
        elif key == "description":
            continue
        else:
            raise _unknown(key, [*SECTIONS, "options", "objective", "preset"], where)


def parse_set(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise LmkitError(f"--set {item!r}: expected key=value, e.g. --set model.n_layer=4")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def apply_set(cfg: RunConfig, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    if section == "options" and name:
        cfg.options[name] = value
        return
    if section in SECTIONS and name:
        apply_section(getattr(cfg, section), {name: value}, section, "--set", cfg)
        return
    if key in ("objective", "preset"):
        setattr(cfg, key, str(value))
        return
    known = [f"{s}.{f.name}" for s in SECTIONS for f in fields(getattr(cfg, s))]
    raise _unknown(key, known, "--set")


MAX_TOML_BYTES = 1 << 20  # a config is a few hundred bytes; refuse to parse megabytes


def load_toml(path: Path) -> dict[str, Any]:
    """A config file as a table; damage (not UTF-8, too deep, too large) is one LmkitError."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_TOML_BYTES + 1)
    except FileNotFoundError:
        raise LmkitError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise LmkitError(f"config file {path} is a directory") from None
    except OSError as exc:
        raise LmkitError(f"config file {path} cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_TOML_BYTES:
        raise LmkitError(f"config file {path} is larger than {MAX_TOML_BYTES:,} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LmkitError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LmkitError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise LmkitError(f"config file {path} nests too deeply to be an lmkit config") from None


def resolve_config(
    *,
    config_file: Path | None = None,
    preset: str | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> RunConfig:
    """Build a RunConfig: defaults < preset < TOML < flags < ``--set``.

    ``flags`` maps dotted keys to values given as CLI flags (None = not given). Giving any budget
    flag (steps/tokens/time) replaces the budget from the preset or file instead of adding to it.
    """
    toml = load_toml(config_file) if config_file else {}
    cfg = RunConfig()
    preset_name = preset or str(toml.get("preset") or cfg.preset)
    if preset_name not in PRESETS:
        raise LmkitError(f"unknown preset {preset_name!r}; available: {', '.join(PRESETS)}")
    apply_mapping(cfg, PRESETS[preset_name], f"preset {preset_name}")
    cfg.preset = preset_name
    apply_mapping(cfg, {k: v for k, v in toml.items() if k != "preset"}, str(config_file))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    if any(f"train.{b}" in given for b in BUDGET_KEYS):
        for b in BUDGET_KEYS:
            setattr(cfg.train, b, type(getattr(cfg.train, b))(0))
    for key, value in given.items():
        apply_set(cfg, key, value)
    for item in sets:
        apply_set(cfg, *parse_set(item))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    check_values(cfg)
    t = cfg.train
    if not (t.steps or t.tokens or t.time):
        raise LmkitError("no training budget: give --steps, --tokens or --time")
    for key in BUDGET_KEYS:
        if getattr(t, key) < 0:
            raise LmkitError(f"--{key} must be positive")
    if t.seq_len <= 0 or t.batch_tokens < t.seq_len:
        raise LmkitError(
            f"train.batch_tokens ({t.batch_tokens}) must be at least train.seq_len ({t.seq_len})"
        )
    if t.dtype not in ("auto", "bf16", "fp32"):
        raise LmkitError(f"train.dtype must be auto, bf16 or fp32, not {t.dtype!r}")


def build_options(options_cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate an objective's Options/EvalOptions dataclass from loose values."""
    obj = options_cls()
    if not dataclasses.is_dataclass(obj):
        if values:
            raise LmkitError(f"{where} takes no options, got {', '.join(values)}")
        return obj
    types_ = field_types(obj)
    for key, value in values.items():
        if key not in types_:
            raise _unknown(f"{where}.{key}", [f"{where}.{k}" for k in types_], where)
        setattr(obj, key, _convert(value, types_[key], f"{where}.{key}"))
    return obj


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"objective": cfg.objective, "preset": cfg.preset}
    for section in SECTIONS:
        out[section] = dataclasses.asdict(getattr(cfg, section))
    out["options"] = dict(cfg.options)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))


def _toml_key(key: str) -> str:
    """A bare key when TOML allows one, else a quoted key."""
    import re

    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and every control character escaped, so a path
    holding a newline still round-trips."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04X}" if not 0xD800 <= code <= 0xDFFF else "\\uFFFD")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML that :func:`resolve_config` reads back to the same config."""
    lines = [f"objective = {_toml_value(cfg.objective)}", f"preset = {_toml_value(cfg.preset)}"]
    sections = {s: dataclasses.asdict(getattr(cfg, s)) for s in SECTIONS}
    sections["options"] = dict(cfg.options)
    for name, values in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()
                  if v is not None]
    return "\n".join(lines) + "\n"


def from_dict(data: dict[str, Any], where: str = "run config") -> RunConfig:
    """Rebuild a RunConfig from :func:`to_dict` output (as stored in a run directory); a
    damaged one (wrong types, bad values) is an LmkitError naming ``where``."""
    if not isinstance(data, dict):
        raise LmkitError(f"{where} is not a table of config sections")
    objective, preset = data.get("objective"), data.get("preset")
    if not isinstance(objective, str) or not isinstance(preset, str):
        raise LmkitError(f"{where} has no objective/preset names")
    cfg = RunConfig(objective=objective, preset=preset)
    for section in SECTIONS:
        values = data.get(section, {})
        if not isinstance(values, dict):
            raise LmkitError(f"{where}: [{section}] must be a table")
        values = {k: v for k, v in values.items() if (section, k) not in MOVED_KEYS}
        apply_section(getattr(cfg, section), values, section, where)
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise LmkitError(f"{where}: [options] must be a table")
    cfg.options = dict(options)
    check_values(cfg, where)
    return cfg


def model_config_from_dict(values: dict[str, Any], where: str = "run.json") -> ModelConfig:
    """A ModelConfig from its stored dict (unknown keys are an error, as everywhere), checked
    against :func:`check_model` before anything is allocated from it."""
    if not isinstance(values, dict):
        raise LmkitError(f"{where}: the model config is not a table")
    cfg = ModelConfig()
    apply_section(cfg, values, "model", where)
    check_model(cfg, where)
    return cfg

