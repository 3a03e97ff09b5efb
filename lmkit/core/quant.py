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

The container these tensors are stored in is :mod:`lmkit.core.artifact`; fitting it under a
byte cap is :mod:`lmkit.core.capfit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from lmkit.errors import LmkitError

KEEP_FLOAT_MAX_NUMEL = 65_536  # tensors with at most this many elements stay fp16
INT8_CLIP_Q = 0.9999984  # the baseline's row clip: 99.99984th percentile of |w|
CLIP_PERCENTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)  # the record's clip candidates
MIN_SCALE = 2.0**-24  # smallest positive fp16: a scale never rounds to zero
MAX_SCALE = 65504.0  # largest finite fp16


RAW_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
              "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float64": torch.float64}


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
