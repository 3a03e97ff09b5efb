"""Value checks for every config key: types, ranges and finiteness, in one place.

``check_values`` runs on every resolved config (defaults < preset < TOML < flags < --set) and on
every stored one, so a bad value fails at once, naming the key, instead of training forever or
allocating gigabytes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any

from lmkit.errors import LmkitError

if typing.TYPE_CHECKING:
    from lmkit.core.config import DataConfig, RunConfig, TrainConfig
    from lmkit.core.optim import OptimConfig
    from lmkit.core.trunk import ModelConfig


def field_types(obj: Any) -> dict[str, Any]:
    """A config dataclass's fields and their (resolved) annotated types."""
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(obj)}


# Sane limits: far above any model lmkit trains, far below what exhausts a machine's memory.
MAX_LAYERS = 256
MAX_WIDTH = 32768  # d_model, cond_dim
MAX_HEADS = 1024
MAX_MLP_MULT = 64.0
MAX_PARAMS = 20_000_000_000  # trunk parameters (about 80 GB in fp32)
MAX_VOCAB = 1 << 20
MAX_SEQ_LEN = 1 << 20
MAX_BATCH_TOKENS = 1 << 32
MAX_STEPS = 10**12
MAX_SECONDS = 366 * 24 * 3600.0  # --time: a year
MAX_PRIME_STEPS = 10_000  # untimed warm-up steps: the baseline runs 20
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit seed
DEVICE_RE = r"auto|cpu|cuda|cuda:\d{1,3}|mps"
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # a registered name (logger, objective, ...)

_UNBOUNDED = math.inf


def _bad(key: str, value: Any, why: str, where: str | None = None) -> LmkitError:
    place = f" ({where})" if where else ""
    return LmkitError(f"{key}={value!r}{place} is invalid: {why}")


def _int_in(obj: Any, section: str, name: str, lo: int, hi: float, where: str | None) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{section}.{name}", value, "expected a whole number", where)
    if not lo <= value <= hi:
        top = "" if hi == _UNBOUNDED else f" and at most {int(hi):,}"
        raise _bad(f"{section}.{name}", value, f"expected at least {lo}{top}", where)


def _float_in(obj: Any, section: str, name: str, lo: float, hi: float, where: str | None, *,
              lo_open: bool = False, hi_open: bool = False) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{section}.{name}", value, "expected a number", where)
    if not math.isfinite(value):
        raise _bad(f"{section}.{name}", value, "expected a finite number", where)
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        hi_text = "inf" if hi == _UNBOUNDED else f"{hi:g}"
        raise _bad(f"{section}.{name}", value,
                   f"expected a value in {left}{lo:g}, {hi_text}{right}", where)


def _types(obj: Any, section: str, where: str | None) -> None:
    """Every field holds its declared type (a dataclass built by hand can hold anything)."""
    for name, typ in field_types(obj).items():
        value = getattr(obj, name)
        want = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ) \
            if isinstance(typ, str) else typ
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if want in (int, float, str, bool) and (
                not isinstance(value, want) or (want is not bool and isinstance(value, bool))):
            raise _bad(f"{section}.{name}", value, f"expected {want.__name__}", where)


def trunk_params(m: ModelConfig, vocab_size: int = 1024) -> int:
    """An estimate of the trunk's parameter count (attention, MLP, embedding, head, AdaLN)."""
    d, hd = m.d_model, m.d_model // max(1, m.n_head)
    attn = d * d * 2 + 2 * d * hd * m.n_kv_head
    mlp = 2 * d * int(m.mlp_mult * d)
    adaln = 6 * d * m.cond_dim if m.time_cond else 0
    embed = vocab_size * d * (1 if m.tie_embeddings else 2)
    return m.n_layer * (attn + mlp + adaln) + embed


def check_model(m: ModelConfig, where: str | None = None, vocab_size: int = 1024) -> None:
    """A model config's types and sane limits, checked before anything is built from it."""
    from lmkit.core.trunk import ACTIVATIONS

    _types(m, "model", where)
    _int_in(m, "model", "n_layer", 1, MAX_LAYERS, where)
    _int_in(m, "model", "d_model", 2, MAX_WIDTH, where)
    _int_in(m, "model", "n_head", 1, MAX_HEADS, where)
    _int_in(m, "model", "n_kv_head", 1, MAX_HEADS, where)
    _int_in(m, "model", "cond_dim", 1, MAX_WIDTH, where)
    if m.d_model % m.n_head:
        raise _bad("model.n_head", m.n_head, f"it must divide model.d_model={m.d_model}", where)
    if (m.d_model // m.n_head) % 2:
        raise _bad("model.d_model", m.d_model, "the head size d_model/n_head must be even (RoPE)",
                   where)
    if m.n_head % m.n_kv_head:
        raise _bad("model.n_kv_head", m.n_kv_head, f"it must divide model.n_head={m.n_head}",
                   where)
    _float_in(m, "model", "mlp_mult", 0.0, MAX_MLP_MULT, where, lo_open=True)
    if int(m.mlp_mult * m.d_model) < 1:
        raise _bad("model.mlp_mult", m.mlp_mult, "the MLP needs a positive hidden width", where)
    _float_in(m, "model", "rope_base", 1.0, 1e12, where, lo_open=True)
    _float_in(m, "model", "q_gain_init", 0.0, 1e6, where)
    _float_in(m, "model", "embed_init_std", 0.0, 1e3, where)
    _float_in(m, "model", "logit_softcap", 0.0, 1e6, where)
    if m.activation not in ACTIVATIONS:
        raise _bad("model.activation", m.activation, f"use one of {', '.join(ACTIVATIONS)}",
                   where)
    params = trunk_params(m, vocab_size)
    if params > MAX_PARAMS:
        raise LmkitError(f"the model config{f' ({where})' if where else ''} describes about "
                         f"{params:,} parameters, more than lmkit's limit of {MAX_PARAMS:,}: "
                         "check model.n_layer / model.d_model")


def check_optim(o: OptimConfig, where: str | None = None) -> None:
    from lmkit.core.optim import OPTIMIZERS

    _types(o, "optim", where)
    if o.name not in OPTIMIZERS:
        raise _bad("optim.name", o.name, f"use one of {', '.join(OPTIMIZERS)}", where)
    for name in ("lr", "matrix_lr", "embed_lr", "head_lr", "scalar_lr"):
        _float_in(o, "optim", name, 0.0, 1e3, where, lo_open=True)
    for name in ("beta1", "beta2", "muon_momentum", "muon_momentum_start"):
        _float_in(o, "optim", name, 0.0, 1.0, where, hi_open=True)
    _float_in(o, "optim", "eps", 0.0, 1.0, where, lo_open=True)
    _float_in(o, "optim", "weight_decay", 0.0, 1e3, where)
    _float_in(o, "optim", "grad_clip", 0.0, 1e9, where)
    _int_in(o, "optim", "muon_momentum_warmup", 0, MAX_STEPS, where)
    _int_in(o, "optim", "muon_ns_steps", 1, 100, where)


def check_train(t: TrainConfig, where: str | None = None) -> None:

    _types(t, "train", where)
    _int_in(t, "train", "steps", 0, MAX_STEPS, where)
    _int_in(t, "train", "tokens", 0, MAX_STEPS * MAX_SEQ_LEN, where)
    _float_in(t, "train", "time", 0.0, MAX_SECONDS, where)
    _int_in(t, "train", "seq_len", 1, MAX_SEQ_LEN, where)
    _int_in(t, "train", "batch_tokens", 1, MAX_BATCH_TOKENS, where)
    _int_in(t, "train", "micro_batch", 0, MAX_BATCH_TOKENS, where)
    _int_in(t, "train", "warmup_steps", 0, MAX_STEPS, where)
    _float_in(t, "train", "warmdown_frac", 0.0, 1.0, where)
    _int_in(t, "train", "log_every", 1, MAX_STEPS, where)
    for name in ("val_every", "ckpt_every"):
        _int_in(t, "train", name, 0, MAX_STEPS, where)
    _int_in(t, "train", "val_tokens", 1, MAX_BATCH_TOKENS, where)
    _int_in(t, "train", "seed", 0, MAX_SEED, where)
    _int_in(t, "train", "prime_steps", 0, MAX_PRIME_STEPS, where)
    _float_in(t, "train", "ema", 0.0, 1.0, where, hi_open=True)
    if not re.fullmatch(DEVICE_RE, t.device):
        raise _bad("train.device", t.device, "expected auto, cpu, cuda or cuda:N", where)
    if not isinstance(t.log, list) or not all(
            isinstance(n, str) and re.fullmatch(NAME_RE, n) for n in t.log):
        raise _bad("train.log", t.log, "expected a list of logger names, e.g. "
                   "[\"tensorboard\"] (see `lmkit loggers`)", where)
    if len(set(t.log)) != len(t.log):
        raise _bad("train.log", t.log, "a logger is listed twice", where)


def check_data(d: DataConfig, where: str | None = None) -> None:
    _types(d, "data", where)
    _int_in(d, "data", "group_size", 0, 1 << 20, where)
    for name in ("path", "tokenizer"):
        value = getattr(d, name)
        if any(c in value for c in "\n\r\x00"):
            raise _bad(f"data.{name}", value, "a path may not hold newlines or NUL bytes", where)


def check_values(cfg: RunConfig, where: str | None = None) -> None:
    """Every key of ``cfg`` has its type, a finite value and a sane range (see the limits)."""
    for name in ("objective", "preset"):
        value = getattr(cfg, name)
        if not isinstance(value, str) or not value or any(c in value for c in "\n\r\x00"):
            raise _bad(name, value, "expected a plain name", where)
    check_model(cfg.model, where)
    check_optim(cfg.optim, where)
    check_train(cfg.train, where)
    check_data(cfg.data, where)
    if not isinstance(cfg.options, dict):
        raise _bad("options", cfg.options, "expected a table", where)
