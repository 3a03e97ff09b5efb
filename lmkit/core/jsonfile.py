"""Strict JSON in, strict JSON out: the one encoder and the one validating reader.

Every JSON lmkit writes (``--json`` output, ``run.json``, ``eval.json``, ``compare.json``,
``pack.json``) goes through :func:`dumps`, so no file or pipe ever holds the bare ``NaN`` or
``Infinity`` that strict parsers reject: a non-finite float becomes ``null`` and, inside an object,
a sibling ``"<key>_reason"`` says what it was. Every JSON file lmkit reads back that a user may
have damaged goes through :func:`read_json` / :func:`read_jsonl`: a valid value of the expected
type, or one :class:`~lmkit.errors.LmkitError` line naming the file. Torch-free.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmkit.errors import LmkitError

MAX_DEPTH = 64  # no lmkit file nests deeper; deeper input is damage (or an attack)
MAX_FILE_BYTES = 256 << 20  # no lmkit JSON file is this large


def non_finite_reason(value: float) -> str:
    return f"not a finite number ({value!r}); the computation diverged or overflowed"


def sanitize(data: Any) -> Any:
    """``data`` as plain JSON values: non-finite floats -> None (with ``<key>_reason`` beside them
    in objects), tuples -> lists, numpy/torch scalars -> Python numbers, other objects -> str."""
    if data is None or isinstance(data, (bool, str, int)):
        return data
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            key = key if isinstance(key, str) else str(key)
            clean = sanitize(value)
            out[key] = clean
            if isinstance(value, float) and clean is None:
                out.setdefault(f"{key}_reason", non_finite_reason(value))
        return out
    if isinstance(data, (list, tuple)):
        return [sanitize(v) for v in data]
    item = getattr(data, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(data, "ndim", 0) == 0:
        try:
            return sanitize(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(data)


def dumps(data: Any, indent: int | None = None, *, sort_keys: bool = False) -> str:
    """Strict JSON text of ``data`` (see :func:`sanitize`); never emits NaN or Infinity."""
    return json.dumps(sanitize(data), indent=indent, allow_nan=False, sort_keys=sort_keys)


def _check_value(value: Any, where: str) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` and strings that are not valid Unicode (lone
    surrogates from ``\\ud800`` escapes), iteratively (no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise LmkitError(f"{where} holds a string that is not valid Unicode "
                                 "(a lone surrogate escape)") from None
            continue
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise LmkitError(f"{where} nests deeper than {MAX_DEPTH} levels")
            children = list(item.keys()) + list(item.values()) if isinstance(item, dict) \
                else item
            stack.extend((c, depth + 1) for c in children)


def loads(text: str | bytes, where: str) -> Any:
    """Parse JSON text (bytes must be UTF-8); any damage is one LmkitError naming ``where``."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LmkitError(f"{where}: not UTF-8 text (byte {exc.start}); it is damaged: "
                             "restore or re-create it") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise LmkitError(f"{where}: nests too deeply to be an lmkit file; it is damaged") from None
    except ValueError as exc:  # JSONDecodeError, and int strings past Python's digit limit
        raise LmkitError(f"{where}: not valid JSON ({exc}); restore or re-create it") from None
    _check_value(value, where)
    return value


def read_json(path: str | Path, missing: str | None = None, *,
              expect: type | tuple[type, ...] = dict, what: str | None = None) -> Any:
    """A JSON file a user may have damaged, as a value of type ``expect``; LmkitError otherwise.

    ``missing``: the message when the file does not exist (default: "<path> does not exist").
    """
    path = Path(path)
    where = what or str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise LmkitError(f"{where} is {size:,} bytes: too large to be an lmkit JSON file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise LmkitError(missing or f"{where} does not exist") from None
    except IsADirectoryError:
        raise LmkitError(f"{where} is a directory, not a JSON file") from None
    except OSError as exc:
        raise LmkitError(f"{where} cannot be read ({exc.strerror or exc})") from None
    value = loads(data, where)
    if not isinstance(value, expect):
        raise LmkitError(f"{where} must hold a JSON {_type_name(expect)}, not "
                         f"{_type_name(type(value))}; it is damaged: restore or re-create it")
    return value


def read_jsonl(path: str | Path, what: str | None = None) -> list[dict[str, Any]]:
    """One JSON object per non-blank line (``metrics.jsonl``); [] when the file is absent."""
    path = Path(path)
    where = what or str(path)
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LmkitError(f"{where} cannot be read ({exc.strerror or exc})") from None
    records = []
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        record = loads(line, f"{where} line {lineno}")
        if not isinstance(record, dict):
            raise LmkitError(f"{where} line {lineno} must be a JSON object, not "
                             f"{_type_name(type(record))}; it is damaged")
        records.append(record)
    return records


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number",
             bool: "boolean", type(None): "null"}
    if isinstance(t, tuple):
        return " or ".join(names.get(x, x.__name__) for x in t)
    return names.get(t, t.__name__)


def require(mapping: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    """``mapping[key]`` checked to be a ``typ`` (bool is never a number here)."""
    if not isinstance(mapping, dict) or key not in mapping:
        raise LmkitError(f"{where} has no {key!r}; it is damaged: restore or re-create it")
    value = mapping[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise LmkitError(f"{where}: {key!r} must be a {_type_name(typ)}, not "
                         f"{_type_name(type(value))}; it is damaged: restore or re-create it")
    return value
