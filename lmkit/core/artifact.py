"""The artifact file: a bounded, pickle-free container for quantized tensors.

Artifact file: a fixed header (:data:`HEADER`: magic, format version, compression, payload length,
compressed length, sha256 of the payload) followed by the compressed payload. The payload is a
little-endian uint32 manifest length, the JSON manifest (model config, token spec, run path, one
entry per tensor with its scheme and the offset/shape/dtype of its arrays) and the raw
little-endian arrays. Loading uses only ``struct``, ``json`` and ``numpy.frombuffer``: no pickle.
Decompression is bounded by the header's length and :func:`payload_limit`; any inconsistency is an
:class:`LmkitError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from lmkit.core import jsonfile
from lmkit.core.quant import FLOAT_DTYPES, RAW_DTYPES, QTensor, _dtype_name
from lmkit.errors import LmkitError

FORMAT = "lmkit-artifact/1"
MAGIC = b"LMKITART"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHBBQQ32s")  # magic, version, compression, reserved, payload, data, sha
MANIFEST_LEN = struct.Struct("<I")
COMPRESSIONS = {"zlib": 1, "lzma": 2}
MAX_FILE_BYTES = 2 << 30  # no artifact is this large; refuse to read it into memory
MAX_PAYLOAD_BYTES = 4 << 30  # absolute ceiling of a decompressed payload
LZMA_MEMLIMIT = 256 << 20  # preset 9 decodes in ~65 MiB; a hostile dictionary size is refused
# Array dtypes an artifact may hold (name -> little-endian numpy dtype).
ARRAY_DTYPES = {
    "int8": "<i1", "uint8": "<u1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
    "float16": "<f2", "float32": "<f4", "float64": "<f8", "bool": "|b1",
}

# ---------------------------------------------------------------------------------------------
# Payload: JSON manifest + raw little-endian arrays
# ---------------------------------------------------------------------------------------------


def _array_bytes(t: Tensor) -> tuple[str, bytes]:
    name = _dtype_name(t)
    arr = t.detach().cpu().contiguous().numpy().astype(ARRAY_DTYPES[name], copy=False)
    return name, arr.tobytes()


def serialize(tensors: list[QTensor], meta: dict[str, Any]) -> bytes:
    """The uncompressed payload: uint32 manifest length, manifest JSON, concatenated arrays."""
    entries, chunks, offset = [], [], 0
    for qt in tensors:
        arrays = {"q": qt.data, "scale": qt.scale} if qt.scheme == "int" else {"values": qt.data}
        specs = {}
        for key, arr in arrays.items():
            dtype, raw = _array_bytes(arr)
            specs[key] = {"dtype": dtype, "shape": list(arr.shape), "offset": offset,
                          "nbytes": len(raw)}
            chunks.append(raw)
            offset += len(raw)
        entry = {"name": qt.name, "shape": list(qt.shape), "dtype": qt.dtype, "scheme": qt.scheme,
                 "arrays": specs}
        if qt.scheme == "int":
            entry.update(bits=qt.bits, method=qt.method)
        entries.append(entry)
    manifest = json.dumps({**meta, "format": FORMAT, "tensors": entries},
                          separators=(",", ":")).encode()
    return MANIFEST_LEN.pack(len(manifest)) + manifest + b"".join(chunks)


def compress(payload: bytes, compression: str) -> bytes:
    if compression == "zlib":
        return zlib.compress(payload, 9)
    if compression == "lzma":
        return lzma.compress(payload, format=lzma.FORMAT_XZ, preset=9)
    raise LmkitError(f"--compression {compression!r}: choose zlib or lzma")


def encode_artifact(payload: bytes, compression: str) -> bytes:
    """Header + compressed payload: the exact bytes of an artifact file."""
    data = compress(payload, compression)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, COMPRESSIONS[compression], 0, len(payload),
                         len(data), hashlib.sha256(payload).digest())
    return header + data


def payload_limit(file_bytes: int) -> int:
    """Most payload bytes a file of this size may decompress to: 64x the file (at least 256 MiB,
    for artifacts of untrained, mostly-zero models), never more than 4 GiB."""
    return min(MAX_PAYLOAD_BYTES, max(256 << 20, 64 * file_bytes))


def decode_artifact(data: bytes, source: str | Path, max_payload: int | None = None) -> bytes:
    """Check header, lengths and sha256 and decompress (bounded); return the payload."""
    src = str(source)

    def corrupt(why: str) -> LmkitError:
        return LmkitError(f"artifact {src} is corrupt or not an lmkit artifact: {why}; "
                          "re-create it with `lmkit pack`")

    if len(data) < HEADER.size:
        raise corrupt(f"{len(data)} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, comp, reserved, length, n_data, sha = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise corrupt(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise LmkitError(f"artifact {src} has format version {version}; this lmkit reads "
                         f"version {FORMAT_VERSION}: re-pack it with this lmkit")
    names = {v: k for k, v in COMPRESSIONS.items()}
    if comp not in names or reserved != 0:
        raise corrupt(f"unknown compression code {comp}/{reserved}")
    if n_data != len(data) - HEADER.size:
        what = "truncated" if n_data > len(data) - HEADER.size else "longer than its header says"
        raise corrupt(f"{what}: the header says {n_data:,} compressed bytes, the file holds "
                      f"{len(data) - HEADER.size:,}")
    limit = payload_limit(len(data)) if max_payload is None else max_payload
    if length > limit or length < MANIFEST_LEN.size:
        raise corrupt(f"the header claims a {length:,}-byte payload (allowed: "
                      f"{MANIFEST_LEN.size}..{limit:,})")
    payload = _decompress(data[HEADER.size:], names[comp], length, corrupt)
    if hashlib.sha256(payload).digest() != sha:
        raise corrupt("sha256 of the payload does not match the header")
    return payload


def _decompress(data: bytes, kind: str, length: int, corrupt: Callable[[str], LmkitError]) -> bytes:
    """Decompress at most ``length + 1`` bytes: a stream that would give more is refused."""
    try:
        if kind == "zlib":
            d = zlib.decompressobj()
            out = d.decompress(data, length + 1)
            ended = d.eof and not d.unused_data and not d.unconsumed_tail
        else:
            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT)
            out = d.decompress(data, max_length=length + 1)
            ended = d.eof and not d.unused_data
    except (zlib.error, lzma.LZMAError, EOFError) as exc:
        raise corrupt(f"its {kind} stream does not decompress ({exc})") from None
    if len(out) > length:
        raise corrupt(f"it decompresses to more than the {length:,} bytes its header says")
    if len(out) < length or not ended:
        raise corrupt(f"it decompresses to {len(out):,} bytes, not the {length:,} its header "
                      "says (or its stream does not end cleanly)")
    return out


def deserialize(payload: bytes, source: str | Path) -> tuple[dict[str, Any], list[QTensor]]:
    """Parse and validate the manifest and arrays of a payload."""
    src = str(source)

    def bad(why: str) -> LmkitError:
        return LmkitError(f"artifact {src} is corrupt: {why}; re-create it with `lmkit pack`")

    if len(payload) < MANIFEST_LEN.size:
        raise bad(f"its {len(payload)}-byte payload has no manifest")
    (n_manifest,) = MANIFEST_LEN.unpack_from(payload)
    start = MANIFEST_LEN.size + n_manifest
    if start > len(payload):
        raise bad(f"manifest length {n_manifest:,} runs past the {len(payload):,}-byte payload")
    try:
        manifest = jsonfile.loads(bytes(payload[MANIFEST_LEN.size:start]), "its manifest")
    except LmkitError as exc:
        raise bad(str(exc)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad(f"manifest format is not {FORMAT!r}")
    entries = manifest.get("tensors")
    if not isinstance(entries, list):
        raise bad("manifest has no tensor list")
    blob = memoryview(payload)[start:]
    tensors, seen = [], set()
    for entry in entries:
        qt = _read_entry(entry, blob, bad)
        if qt.name in seen:
            raise bad(f"tensor {qt.name} appears twice")
        seen.add(qt.name)
        tensors.append(qt)
    return manifest, tensors


def _shape(value: Any) -> tuple[int, ...] | None:
    ok = isinstance(value, list) and len(value) <= 8 and all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in value)
    return tuple(value) if ok else None


def _read_array(spec: Any, blob: memoryview, what: str, bad: Callable[[str], LmkitError]) -> Tensor:
    if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str) \
            or spec["dtype"] not in ARRAY_DTYPES:
        raise bad(f"{what} has no valid dtype")
    shape = _shape(spec.get("shape"))
    offset, nbytes = spec.get("offset"), spec.get("nbytes")
    if shape is None or not all(isinstance(v, int) and v >= 0 for v in (offset, nbytes)):
        raise bad(f"{what} has an invalid shape, offset or length")
    dtype = np.dtype(ARRAY_DTYPES[spec["dtype"]])
    count = math.prod(shape)
    if count * dtype.itemsize != nbytes:
        raise bad(f"{what}: shape {list(shape)} of {spec['dtype']} is not {nbytes:,} bytes")
    if offset + nbytes > len(blob):
        raise bad(f"{what} runs past the end of the payload")
    if spec["dtype"] == "bool":  # any byte other than 0/1 is not a bool numpy should see
        raw = np.frombuffer(blob, dtype=np.uint8, count=count, offset=offset)
        return torch.from_numpy(raw != 0).reshape(shape)
    arr = np.frombuffer(blob, dtype=dtype, count=count, offset=offset)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True)).reshape(shape)


def _read_entry(entry: Any, blob: memoryview, bad: Callable[[str], LmkitError]) -> QTensor:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise bad("a tensor entry has no name")
    name, scheme, dtype = entry["name"], entry.get("scheme"), entry.get("dtype")
    if not isinstance(dtype, str) or not isinstance(scheme, str):
        raise bad(f"tensor {name} has no valid dtype or scheme")
    shape = _shape(entry.get("shape"))
    arrays = entry.get("arrays")
    if shape is None or not isinstance(arrays, dict):
        raise bad(f"tensor {name} has an invalid shape or arrays")
    numel = math.prod(shape)
    if scheme == "int":
        bits = entry.get("bits")
        if dtype not in FLOAT_DTYPES or bits not in range(2, 9) or set(arrays) != {"q", "scale"}:
            raise bad(f"tensor {name}: invalid int entry")
        q = _read_array(arrays["q"], blob, f"{name}.q", bad)
        scale = _read_array(arrays["scale"], blob, f"{name}.scale", bad)
        rows = shape[0] if len(shape) == 2 else 1
        if (q.dtype != torch.int8 or scale.dtype != torch.float16 or q.dim() != 2
                or q.size(0) != rows or q.numel() != numel or tuple(scale.shape) != (rows,)):
            raise bad(f"tensor {name}: q {list(q.shape)} / scale {list(scale.shape)} do not "
                      f"match shape {list(shape)}")
        qmax = 2 ** (bits - 1) - 1
        if q.numel() and int(q.to(torch.int16).abs().max()) > qmax:  # int8 abs(-128) wraps
            raise bad(f"tensor {name}: values outside [-{qmax}, {qmax}] for {bits} bits")
        if not torch.isfinite(scale).all():
            raise bad(f"tensor {name}: non-finite scales")
        return QTensor(name, shape, dtype, "int", q, scale, bits, entry.get("method"))
    if scheme in ("fp16", "raw") and set(arrays) == {"values"}:
        values = _read_array(arrays["values"], blob, f"{name}.values", bad)
        want = "float16" if scheme == "fp16" else dtype
        ok = FLOAT_DTYPES if scheme == "fp16" else RAW_DTYPES
        if dtype not in ok or _dtype_name(values) != want or tuple(values.shape) != shape:
            raise bad(f"tensor {name}: {scheme} values do not match dtype {dtype} / shape "
                      f"{list(shape)}")
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            raise bad(f"tensor {name}: non-finite ({scheme}) values")
        return QTensor(name, shape, dtype, scheme, values)
    raise bad(f"tensor {name} has unknown scheme {scheme!r}")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def read_artifact(path: str | Path, max_payload: int | None = None
                  ) -> tuple[dict[str, Any], list[QTensor]]:
    """Read and fully validate an artifact file: (manifest, stored tensors)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise LmkitError(f"artifact {path} is {size:,} bytes: too large for an lmkit artifact")
        data = path.read_bytes()
    except FileNotFoundError:
        raise LmkitError(f"artifact {path} does not exist") from None
    except IsADirectoryError:
        raise LmkitError(f"artifact {path} is a directory, not an artifact file") from None
    declared = declared_payload(data)
    if declared is not None:  # decompress no more than the manifest's tensors need
        claimed = HEADER.unpack_from(data)[4]
        if claimed > declared:
            raise LmkitError(f"artifact {path} is corrupt: its header claims a {claimed:,}-byte "
                             f"payload but its manifest's tensors need only {declared:,} bytes "
                             "(missing tensor entries?); re-create it with `lmkit pack`")
        limit = payload_limit(len(data)) if max_payload is None else max_payload
        max_payload = min(limit, declared)
    return deserialize(decode_artifact(data, path, max_payload), path)


MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB per hundred tensors


def declared_payload(data: bytes) -> int | None:
    """The payload size the manifest's arrays add up to (manifest included), read by
    decompressing only the manifest; None when it cannot be read (then decoding and
    :func:`deserialize` report the damage, within :func:`payload_limit`)."""
    if len(data) < HEADER.size:
        return None
    comp = data[10] if len(data) > 10 else 0
    kind = {v: k for k, v in COMPRESSIONS.items()}.get(comp)
    try:
        if kind == "zlib":
            d: Any = zlib.decompressobj()
            head = d.decompress(data[HEADER.size:], MANIFEST_LEN.size)
        elif kind == "lzma":
            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT)
            head = d.decompress(data[HEADER.size:], max_length=MANIFEST_LEN.size)
        else:
            return None
        if len(head) < MANIFEST_LEN.size:
            return None
        (n_manifest,) = MANIFEST_LEN.unpack_from(head)
        if n_manifest > MAX_MANIFEST_BYTES:
            return None
        if kind == "zlib":
            raw = d.decompress(d.unconsumed_tail, n_manifest)
        else:
            raw = d.decompress(b"", max_length=n_manifest)
        manifest = json.loads(raw.decode("utf-8")) if len(raw) == n_manifest else None
    except (zlib.error, lzma.LZMAError, EOFError, ValueError, RecursionError):
        return None
    entries = manifest.get("tensors") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        return None
    end = 0
    for entry in entries:
        arrays = entry.get("arrays") if isinstance(entry, dict) else None
        for spec in (arrays.values() if isinstance(arrays, dict) else ()):
            if not isinstance(spec, dict):
                return None
            offset, nbytes = spec.get("offset"), spec.get("nbytes")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       for v in (offset, nbytes)):
                return None
            end = max(end, offset + nbytes)
    return MANIFEST_LEN.size + n_manifest + end


def load_artifact(path: str | Path, device: str | torch.device = "cpu",
                  like: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model an artifact describes, with its dequantized weights: (model, manifest).

    ``like``: the run's model, copied for its structure (an objective's own modules are built by
    the objective, not described by the manifest); its config must be the manifest's.
    """
    manifest, tensors = read_artifact(path)
    return model_from_tensors(manifest, tensors, path, like).to(torch.device(device)).eval(), \
        manifest


def model_from_tensors(manifest: dict[str, Any], tensors: list[QTensor], source: str | Path,
                       like: nn.Module | None = None) -> nn.Module:
    """The model ``manifest`` describes (or a copy of ``like``), holding ``tensors``."""
    import copy
    from dataclasses import asdict

    from lmkit.core.build import compare_shapes, new_model, trunk_shapes
    from lmkit.core.config import MAX_VOCAB, model_config_from_dict

    model_meta = manifest.get("model")
    try:
        if not isinstance(model_meta, dict) or not isinstance(model_meta.get("config"), dict):
            raise KeyError("model.config")
        cfg = model_config_from_dict(dict(model_meta["config"]), f"artifact {source}")
        vocab, n_special = model_meta["vocab_size"], model_meta["n_special"]
        if not (isinstance(vocab, int) and isinstance(n_special, int)
                and 1 <= vocab <= MAX_VOCAB and 0 <= n_special <= 64):
            raise ValueError(f"vocab_size {vocab!r}, n_special {n_special!r}")
        # the tensors present must be the model's before the model is allocated
        compare_shapes({qt.name: tuple(qt.shape) for qt in tensors},
                       trunk_shapes(cfg, vocab, n_special), f"artifact {source}")
        if like is None:
            model = new_model(cfg, vocab, n_special)
        else:
            if asdict(like.cfg) != asdict(cfg):
                raise LmkitError(f"artifact {source} was packed from a model with another "
                                 "config than its run's; re-pack it from that run")
            model = copy.deepcopy(like)
    except (KeyError, TypeError, ValueError) as exc:
        raise LmkitError(f"artifact {source}: its manifest does not describe a model "
                         f"({exc!r}); re-create it with `lmkit pack`") from None
    load_tensors(model, tensors, source)
    return model


def load_tensors(model: nn.Module, tensors: list[QTensor], source: str | Path) -> None:
    """Dequantize into ``model``; names and shapes must match its state dict exactly."""
    state = model.state_dict()
    stored = {qt.name: qt for qt in tensors}
    missing, extra = sorted(set(state) - set(stored)), sorted(set(stored) - set(state))
    if missing or extra:
        raise LmkitError(f"artifact {source} does not match its model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for name, ref in state.items():
        if tuple(ref.shape) != stored[name].shape:
            raise LmkitError(f"artifact {source}: tensor {name} has shape "
                             f"{list(stored[name].shape)}, the model wants {list(ref.shape)}")
    model.load_state_dict({n: stored[n].dequantize() for n in state}, strict=True)
