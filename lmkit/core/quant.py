"""Quantized artifacts under a byte cap: int8 rows, int6 GPTQ, selective pruning, safe loading.

Two recipes (DESIGN.md "Artifacts"):

* **baseline** (``bits=8, method="rtn"``): every 2-D float tensor with more than 65,536 elements
  becomes per-row int8 with the row clipped at the 99.99984th percentile of ``|w|`` and
  ``scale = clip/127`` stored in fp16; smaller float tensors are stored fp16; zlib level 9.
* **record** (``bits=6``, ``method="gptq"`` or ``"rtn"``): the attention/MLP matrices (the
  ``matrix`` group of :meth:`Transformer.param_groups`) become int6 (values in [-31, 31]) with a
  per-row fp16 scale ``clip/31``; the clip is chosen *per row* from the percentiles
  :data:`CLIP_PERCENTILES` of ``|w|`` by the row's reconstruction error (weighted by the Hessian
  diagonal when there is one). GPTQ then rounds column by column, spreading each column's rounding
  error onto the columns not yet rounded. The embedding is int8 rows (whatever its size), other
  tensors follow the baseline rule; LZMA preset 9.

Hessians come from one pass of the full-precision model over calibration data (not layer by layer
through already-quantized layers): simpler, and what parameter-golf records do.

Integer values are stored one per byte (int8 containers); the compressor removes the slack of
the unused high bits better than a bit-packing would.

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
import os
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from lmkit.errors import LmkitError

DEFAULT_CAP_BYTES = 16_000_000  # decimal bytes, as parameter-golf counts them (not 16 MiB)
KEEP_FLOAT_MAX_NUMEL = 65_536  # tensors with at most this many elements stay fp16
INT8_CLIP_Q = 0.9999984  # the baseline's row clip: 99.99984th percentile of |w|
CLIP_PERCENTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)  # the record's clip candidates
MIN_SCALE = 2.0**-24  # smallest positive fp16: a scale never rounds to zero
MAX_SCALE = 65504.0  # largest finite fp16

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
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float64": torch.float64}
RAW_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
              "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}


# ---------------------------------------------------------------------------------------------
# Row quantizers
# ---------------------------------------------------------------------------------------------


def row_quantiles(x: Tensor, qs: tuple[float, ...] | list[float]) -> Tensor:
    """``torch.quantile(x, q, dim=1)`` for each q ([len(qs), rows]), without its size limit.

    torch.quantile refuses inputs above 16M elements (a large embedding); one sort serves all qs.
    """
    vals = x.float().sort(dim=1).values
    n = vals.size(1)
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = min(int(math.floor(pos)), n - 1)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        out.append(vals[:, lo] + frac * (vals[:, hi] - vals[:, lo]))
    return torch.stack(out)


def scale_for(clip: Tensor, qmax: int) -> Tensor:
    """fp16-exact scale ``clip/qmax`` (float32 holding fp16 values), never zero or infinite."""
    return (clip / qmax).clamp(MIN_SCALE, MAX_SCALE).half().float()


def round_rows(w: Tensor, scale: Tensor, qmax: int, clip: Tensor | None = None) -> Tensor:
    """Round-to-nearest on a per-row grid: int8 values in [-qmax, qmax]."""
    w = w.float()
    if clip is not None:
        w = torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None])
    return torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax).to(torch.int8)


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    """The one dequantization: float32 ``q * scale`` per row (pack and load agree bit for bit)."""
    return q.float() * scale.float()[:, None]


def quantize_int8_baseline(w: Tensor) -> tuple[Tensor, Tensor]:
    """The baseline's per-row int8: clip at the 99.99984th percentile of |w|, scale = clip/127."""
    w = w.float()
    clip = row_quantiles(w.abs(), [INT8_CLIP_Q])[0]
    scale = scale_for(clip, 127)
    return round_rows(w, scale, 127, clip), scale


def search_clip(
    w: Tensor, bits: int, col_weight: Tensor | None = None,
    percentiles: tuple[float, ...] = CLIP_PERCENTILES,
) -> tuple[Tensor, Tensor]:
    """Per row, the percentile clip whose round-to-nearest error is smallest: (q, scale).

    The error is ``sum_j c_j (w_ij - q_ij s_i)^2`` with ``c`` the Hessian diagonal where known (the
    output error of each column on its own), else 1.
    """
    w = w.float()
    qmax = 2 ** (bits - 1) - 1
    clips = row_quantiles(w.abs(), percentiles)
    c = torch.ones(w.size(1), device=w.device) if col_weight is None else col_weight.float()
    best_q, best_s, best_err = None, None, None
    for clip in clips:
        s = scale_for(clip, qmax)
        q = round_rows(w, s, qmax, clip)
        err = ((w - dequantize_rows(q, s)).square() * c).sum(dim=1)
        if best_err is None:
            best_q, best_s, best_err = q, s, err
            continue
        better = err < best_err
        best_q = torch.where(better[:, None], q, best_q)
        best_s = torch.where(better, s, best_s)
        best_err = torch.minimum(err, best_err)
    return best_q, best_s


def gptq_quantize(
    w: Tensor, H: Tensor, scale: Tensor, bits: int, *,
    block_size: int = 128, damp: float = 0.01, act_order: bool = True,
) -> Tensor:
    """GPTQ rounding of ``w`` [rows, cols] on fixed per-row scales; returns int8 q.

    Minimises ``||X w^T - X q^T||`` for inputs with second moment ``H = X^T X``: columns are rounded
    one at a time (largest diag(H) first with act-order) and each rounding error is spread onto the
    remaining columns through the upper Cholesky factor of ``H^-1``; within a block of
    ``block_size`` columns updates are applied at once to the rest ("lazy batch" updates).
    """
    qmax = 2 ** (bits - 1) - 1
    W = w.float().clone()
    H = H.float().clone()
    cols = W.size(1)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0  # a column that never saw input: rounded on its own
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp)
    if Hinv is None:  # not positive definite even with heavy damping: plain rounding
        return round_rows(w, scale, qmax)
    s = scale.float()
    Q = torch.zeros_like(W, dtype=torch.int8)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            q = torch.clamp(torch.round(col / s), -qmax, qmax)
            Q[:, i1 + i] = q.to(torch.int8)
            err = (col - q * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor | None:
    """Upper Cholesky factor of ``(H + d I)^-1``, ``d = damp * mean(diag H)`` (raised if needed)."""
    mean_diag = torch.diag(H).mean().clamp_min(1e-12)
    eye = torch.eye(H.size(0), device=H.device)
    for factor in (1.0, 10.0, 100.0):
        L, info = torch.linalg.cholesky_ex(H + damp * factor * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
    return None


# ---------------------------------------------------------------------------------------------
# Whole-model quantization
# ---------------------------------------------------------------------------------------------


@dataclass
class QTensor:
    """One state-dict entry as stored: ``scheme`` is ``int`` (q [rows, cols] int8 + fp16 scale
    per row), ``fp16`` or ``raw`` (a non-float tensor kept as is).

    ``col_weight`` (per column, mean 1; not stored) ranks ±1 values for pruning.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # the original tensor's dtype name (what dequantization returns)
    scheme: str
    data: Tensor  # q (int), fp16 values, or the raw tensor; on CPU
    scale: Tensor | None = None
    bits: int | None = None
    method: str | None = None  # "gptq" | "rtn" | "baseline" for int tensors
    col_weight: Tensor | None = None

    def dequantize(self) -> Tensor:
        if self.scheme == "int":
            w = dequantize_rows(self.data, self.scale).reshape(self.shape)
            return w.to(FLOAT_DTYPES[self.dtype])
        if self.scheme == "fp16":
            return self.data.reshape(self.shape).to(FLOAT_DTYPES[self.dtype])
        return self.data.reshape(self.shape).clone()


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _as_rows(t: Tensor) -> Tensor:
    """2-D tensors quantize per row; anything else as a single row (one scale)."""
    return t.reshape(t.shape[0], -1) if t.dim() == 2 else t.reshape(1, -1)


def _int_tensor(name: str, t: Tensor, q: Tensor, scale: Tensor, bits: int, method: str,
                col_weight: Tensor | None = None) -> QTensor:
    return QTensor(name, tuple(t.shape), _dtype_name(t), "int", q.cpu().contiguous(),
                   scale.half().cpu().contiguous(), bits, method,
                   None if col_weight is None else col_weight.float().cpu())


def quantize_baseline_tensor(name: str, t: Tensor, small_max: int = KEEP_FLOAT_MAX_NUMEL,
                             force_int8: bool = False) -> QTensor:
    """The baseline rule for one tensor: int8 rows if float and large (or forced), else fp16/raw."""
    t = t.detach()
    if not t.is_floating_point():
        if _dtype_name(t) not in RAW_DTYPES:
            raise LmkitError(f"cannot store tensor {name} of dtype {t.dtype} in an artifact")
        return QTensor(name, tuple(t.shape), _dtype_name(t), "raw", t.cpu().contiguous())
    if (t.numel() > small_max or force_int8) and t.numel() > 0:
        q, scale = quantize_int8_baseline(_as_rows(t))
        return _int_tensor(name, t, q, scale, 8, "baseline")
    return QTensor(name, tuple(t.shape), _dtype_name(t), "fp16", t.half().cpu().contiguous())


def matrix_names(model: nn.Module) -> list[str]:
    """State-dict names of the attention/MLP matrices (the trunk's ``matrix`` group)."""
    inner = getattr(model, "_orig_mod", model)
    ids = {id(p) for p in inner.param_groups()["matrix"]}
    return [n for n, p in inner.named_parameters() if id(p) in ids]


def embed_names(model: nn.Module) -> list[str]:
    inner = getattr(model, "_orig_mod", model)
    ids = {id(p) for p in inner.param_groups()["embed"]}
    return [n for n, p in inner.named_parameters() if id(p) in ids]


def quantize_model(
    model: nn.Module, *, bits: int = 6, method: str = "gptq",
    hessians: dict[str, Tensor] | None = None, small_max: int = KEEP_FLOAT_MAX_NUMEL,
    block_size: int = 128, damp: float = 0.01, percentiles: tuple[float, ...] = CLIP_PERCENTILES,
) -> list[QTensor]:
    """Quantize a Transformer's state dict with the baseline (bits=8, rtn) or record recipe."""
    if not 2 <= bits <= 8:
        raise LmkitError(f"--bits {bits}: choose 6 or 8 (2..8 are supported)")
    if method not in ("gptq", "rtn"):
        raise LmkitError(f"--method {method!r}: choose gptq or rtn")
    inner = getattr(model, "_orig_mod", model)
    state = inner.state_dict()
    if bits == 8 and method == "rtn":  # the baseline recipe, untouched
        return [quantize_baseline_tensor(n, t, small_max) for n, t in state.items()]
    matrices, embeds = set(matrix_names(inner)), set(embed_names(inner))
    hessians = hessians or {}
    out = []
    for name, t in state.items():
        if name in matrices:
            out.append(quantize_matrix(name, t, bits, method, hessians.get(name),
                                       block_size=block_size, damp=damp, percentiles=percentiles))
        else:
            out.append(quantize_baseline_tensor(name, t, small_max, force_int8=name in embeds))
    return out


def quantize_matrix(
    name: str, t: Tensor, bits: int, method: str, H: Tensor | None, *,
    block_size: int = 128, damp: float = 0.01, percentiles: tuple[float, ...] = CLIP_PERCENTILES,
) -> QTensor:
    """int``bits`` rows with a searched clip; GPTQ rounding when a Hessian is given."""
    w = t.detach().float().reshape(t.shape[0], -1)
    diag = None if H is None else torch.diag(H).float().to(w.device)
    col_weight = None if diag is None else diag / diag.mean().clamp_min(1e-12)
    q, scale = search_clip(w, bits, col_weight, percentiles)
    used = "rtn"
    if method == "gptq" and H is not None:
        q = gptq_quantize(w, H.to(w.device), scale, bits, block_size=block_size, damp=damp)
        used = "gptq"
    return _int_tensor(name, t, q, scale, bits, used, col_weight)


def collect_hessians(
    model: nn.Module, run_forward: Callable[[], Any]
) -> tuple[dict[str, Tensor], int]:
    """``H = X^T X / n`` of the inputs of every matrix-group Linear while ``run_forward()`` runs.

    Returns (Hessians by weight name, number of input rows seen per layer).
    """
    inner = getattr(model, "_orig_mod", model)
    names = set(matrix_names(inner))
    wanted = {id(p): n for n, p in inner.named_parameters() if n in names}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            if name not in sums:
                sums[name] = torch.zeros(x.size(1), x.size(1), device=x.device)
                counts[name] = 0
            sums[name].addmm_(x.T, x)
            counts[name] += x.size(0)
        return hook

    for module in inner.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in wanted:
            handles.append(module.register_forward_pre_hook(hook_for(wanted[id(module.weight)])))
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    rows = min(counts.values()) if counts else 0
    return {n: s / max(counts[n], 1) for n, s in sums.items()}, rows


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
        manifest = json.loads(payload[MANIFEST_LEN.size:start].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"its manifest is not valid JSON ({type(exc).__name__})") from None
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
    if not isinstance(spec, dict) or spec.get("dtype") not in ARRAY_DTYPES:
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
        return QTensor(name, shape, dtype, scheme, values)
    raise bad(f"tensor {name} has unknown scheme {scheme!r}")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file + rename: an interrupted pack never leaves a half artifact under the real name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    return deserialize(decode_artifact(data, path, max_payload), path)


def load_artifact(path: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model an artifact describes, with its dequantized weights: (model, manifest)."""
    from lmkit.core.config import model_config_from_dict
    from lmkit.core.trunk import Transformer

    manifest, tensors = read_artifact(path)
    model_meta = manifest.get("model")
    try:
        cfg = model_config_from_dict(dict(model_meta["config"]))
        model = Transformer(cfg, int(model_meta["vocab_size"]), int(model_meta["n_special"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise LmkitError(f"artifact {path}: its manifest does not describe a model ({exc!r}); "
                         "re-create it with `lmkit pack`") from None
    load_tensors(model, tensors, path)
    return model.to(torch.device(device)).eval(), manifest


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


# ---------------------------------------------------------------------------------------------
# Selective pruning to a byte cap
# ---------------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """All ±1 integer values, cheapest to zero first (cost ``scale^2 * col_weight``)."""

    tensor: Tensor  # index into the tensor list, per candidate
    flat: Tensor  # flat index into that tensor's q

    def __len__(self) -> int:
        return self.flat.numel()


def prune_candidates(tensors: list[QTensor]) -> Candidates:
    """Rank ±1 values by the squared output error that zeroing each adds (its own share).

    Zeroing a ±1 value moves the weight by one step ``s``: ``s^2`` in weight space, times the
    input's second moment ``H_jj`` (normalised per matrix) where calibration measured it.
    """
    idx, flat, cost = [], [], []
    for i, qt in enumerate(tensors):
        if qt.scheme != "int":
            continue
        q = qt.data
        c = qt.scale.float()[:, None].square().expand(q.shape)
        if qt.col_weight is not None:
            c = c * qt.col_weight[None, :]
        mask = (q == 1) | (q == -1)
        where = mask.flatten().nonzero().squeeze(1)
        idx.append(torch.full((where.numel(),), i, dtype=torch.int32))
        flat.append(where)
        cost.append(c.flatten()[where])
    if not flat:
        return Candidates(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.long))
    order = torch.argsort(torch.cat(cost), stable=True)
    return Candidates(torch.cat(idx)[order], torch.cat(flat)[order])


def apply_pruning(tensors: list[QTensor], cands: Candidates, k: int) -> list[QTensor]:
    """A copy of ``tensors`` with the ``k`` cheapest ±1 values set to zero."""
    out = list(tensors)
    chosen_t, chosen_f = cands.tensor[:k], cands.flat[:k]
    for i in torch.unique(chosen_t).tolist():
        q = tensors[i].data.clone()
        q.view(-1)[chosen_f[chosen_t == i]] = 0
        out[i] = replace(tensors[i], data=q)
    return out


@dataclass
class Packed:
    """The bytes that fit, the tensors they hold, and how they got there."""

    data: bytes
    tensors: list[QTensor]
    pruned: int
    candidates: int
    unpruned_bytes: int
    probes: int


def fit_to_cap(
    tensors: list[QTensor], meta: dict[str, Any], compression: str, cap_bytes: int | None, *,
    source: str | Path = "artifact", max_probes: int = 16, tolerance: float = 0.002,
    slack: float = 0.001, log: Callable[[str], None] | None = None,
) -> Packed:
    """Encode ``tensors``; if over ``cap_bytes`` (decimal, compared with the file's exact length),
    zero the cheapest ±1 values, as few as a bracketed search over the count finds.

    The count brackets between an over-cap k (lo) and an under-cap k (hi), probing by linear
    interpolation of the compressed size (bisection when it stalls), until the bracket is within
    ``tolerance`` of the candidates or the fitting encoding is within ``slack`` of the cap (each
    probe compresses the whole artifact: seconds at 16 MB). The result is always a measured
    under-cap encoding.
    """
    def encode(ts: list[QTensor], k: int) -> bytes:
        return encode_artifact(serialize(ts, {**meta, "pruned_values": k}), compression)

    data = encode(tensors, 0)
    if cap_bytes is None or len(data) <= cap_bytes:
        return Packed(data, tensors, 0, 0, len(data), 1)
    cands = prune_candidates(tensors)
    n = len(cands)
    full_tensors = apply_pruning(tensors, cands, n)
    full = encode(full_tensors, n) if n else data
    if len(full) > cap_bytes:
        raise LmkitError(
            f"{source} cannot fit --cap-bytes {cap_bytes:,} (decimal bytes): it is "
            f"{len(data):,} bytes, and still {len(full):,} with all {n:,} ±1 values pruned; "
            "raise --cap-bytes, use fewer --bits, or train a smaller model"
        )
    lo, lo_size, hi, best = 0, len(data), n, Packed(full, full_tensors, n, n, len(data), 2)
    probes, bisect = 2, False
    def close_enough() -> bool:
        return (hi - lo <= max(1, int(tolerance * n))
                or cap_bytes - len(best.data) <= slack * cap_bytes)

    while not close_enough() and probes < max_probes:
        width = hi - lo
        if bisect:
            k = (lo + hi) // 2
        else:  # aim a little past the interpolated crossing, so the probe likely fits
            frac = (lo_size - cap_bytes) / max(lo_size - len(best.data), 1)
            k = lo + math.ceil(width * min(1.0, frac * 1.02))
        k = min(max(k, lo + 1), hi - 1)
        trial = apply_pruning(tensors, cands, k)
        blob = encode(trial, k)
        probes += 1
        if len(blob) <= cap_bytes:
            hi, best = k, Packed(blob, trial, k, n, len(data), probes)
        else:
            lo, lo_size = k, len(blob)
        bisect = hi - lo > width // 2  # interpolation did not halve the bracket: bisect next
        if log:
            log(f"prune {k:,}/{n:,} ±1 values → {len(blob):,} bytes "
                f"({'fits' if len(blob) <= cap_bytes else 'over'} {cap_bytes:,})")
    best.probes = probes
    return best
