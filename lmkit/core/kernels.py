"""Pieces of the trunk computed faster than PyTorch's default path, with the same values.

:func:`linear` routes bf16 GEMMs around PyTorch's emulation on CPUs without bf16 instructions.
Autograd differentiates RoPE, ReLU², (on CPU) RMSNorm and the soft-capped head's cross-entropy op
by op, one pass over the activations per op; these compute the same values (bit for bit for
ReLU², to float rounding for the others) in fewer passes, which is most of a CPU training step
that matmuls do not take.
:func:`causal_attention` runs training's causal attention as GEMMs over blocks of query rows
where SDPA's CPU flash kernel is slower: bf16 on CPUs with bf16 instructions, float32 on AVX-512.
``torch.compile`` traces them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmkit.core.device import cpu_has_native_bf16

_CPU_BF16_NATIVE = cpu_has_native_bf16()  # read once: a constant to torch.compile too
# float32 training attention takes the chunked path where PyTorch's CPU kernels are AVX-512 ones:
# on a 2-core AVX-512 AMD EPYC its forward and backward at ``small``'s shape ran 1.39x faster
# than SDPA's flash kernel and compiled ``small`` ar training steps about 1.04x (two back-to-back
# ``lmkit bench train`` runs against one), while on an AVX2 EPYC the training step was 0.92x.
_CPU_FP32_CHUNKED = torch.backends.cpu.get_cpu_capability() == "AVX512"


def _exact_in_float32(t: Tensor) -> Tensor:
    """``t`` rounded to bf16, held in float32 (exactly: bf16 is float32 with a shorter mantissa)."""
    return t.to(torch.bfloat16).float()


def emulated_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is on for ``device``, a CPU without bf16 instructions."""
    return (device.type == "cpu" and not _CPU_BF16_NATIVE and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, except under CPU bf16 autocast on a CPU without bf16 instructions.

    There it computes what a bf16 GEMM with float32 accumulation computes (operands rounded to
    bf16, float32 products, which are exact, and float32 sums; the result rounded to bf16) with
    a float32 GEMM: PyTorch's emulated bf16 GEMM ran at 11.6 GFLOP/s on this project's 2-core
    AVX2 machine, float32 at 99 ([2048, 256] x [256, 768]). Gradients flow through the casts, so
    they are rounded to bf16 where autocast's would be. (``torch.compile`` would turn this back
    into a bf16 GEMM, so the trunk's compiled blocks run eager there.)
    """
    if emulated_bf16(x.device):
        with torch.autocast("cpu", enabled=False):
            b = None if bias is None else _exact_in_float32(bias)
            y = F.linear(_exact_in_float32(x), _exact_in_float32(weight), b)
        return y.to(torch.bfloat16)
    return F.linear(x, weight, bias)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((torch.addcmul(x1 * cos, x2, sin), torch.addcmul(x2 * cos, x1, -sin)), dim=-1)


class _Rotary(torch.autograd.Function):
    """RoPE with its hand-written backward: the gradient of a rotation is the inverse rotation
    (five elementwise passes, where autograd's chain of muls, adds and a cat takes more)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of each head ([B, H, T, hd]) by position-dependent angles."""
    return _Rotary.apply(x, cos.to(x.dtype), sin.to(x.dtype))


class _ReLU2(torch.autograd.Function):
    """``relu(h)**2``, whose gradient ``2 relu(h) g`` needs no separate mask pass: half the time
    of autograd's square-then-threshold backward, bit for bit the same values."""

    @staticmethod
    def forward(ctx: Any, h: Tensor) -> Tensor:
        r = F.relu(h)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (r,) = ctx.saved_tensors
        return grad.mul(r).mul_(2.0)


def recording(t: Tensor) -> bool:
    """Whether autograd records operations on ``t`` (so an in-place op would be wrong)."""
    return t.requires_grad and torch.is_grad_enabled()


def relu2(h: Tensor, inplace: bool = False) -> Tensor:
    """``relu(h) ** 2`` (the baseline's MLP activation). ``inplace`` (for a tensor the caller
    owns, e.g. a matmul's output) overwrites ``h`` where no gradient is taken: two passes and
    no allocation, the same values bit for bit (evaluation 1.07x faster on this CPU)."""
    if inplace and not recording(h):
        return h.relu_().square_()
    return _ReLU2.apply(h)


def _inverse_rms(x: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(mean(x**2) + eps)`` per row ([..., 1], at least float32): one reduction, no
    temporary."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True,
                                 dtype=torch.promote_types(x.dtype, torch.float32))
    return n.square_().div_(x.size(-1)).add_(eps).rsqrt_()


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1, keepdim=True)``; a batched matrix-vector product for contiguous rows
    (no [..., d] temporary), the elementwise form otherwise (where matmul would copy)."""
    if a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype:
        return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1)
    return (a * b).sum(-1, keepdim=True)


class _RMSNorm(torch.autograd.Function):
    """Weightless RMSNorm whose backward is its closed form, ``dx = r (g - y mean(g y))``
    (three passes; PyTorch's CPU backward differentiates the pow/mean/rsqrt/mul chain)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, eps: float) -> Tensor:
        r = _inverse_rms(x, eps)
        y = (x * r).to(x.dtype)
        ctx.save_for_backward(y, r)  # y is the next layer's input: saved there anyway
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        y, r = ctx.saved_tensors
        mean_gy = _row_dot(grad, y).div_(y.size(-1))
        return torch.addcmul(grad, y, mean_gy, value=-1).mul_(r).to(grad.dtype), None


def rms_norm(x: Tensor) -> Tensor:
    """RMSNorm over the last dimension without a gain, with ``F.rms_norm``'s default eps: that
    of the dtype it computes in (float32 for bf16 and fp16 inputs, not bf16's own 2^-7, which
    would normalise small rows differently in training than in evaluation). CUDA (and
    inference) use PyTorch's kernel; CPU training uses :class:`_RMSNorm` (a ``small`` training
    step 1.04x faster, interleaved A/B)."""
    if x.is_cuda or not recording(x):
        return F.rms_norm(x, (x.size(-1),))
    return _RMSNorm.apply(x, torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps)


class _SoftcapNats(torch.autograd.Function):
    """Cross-entropy of soft-capped logits ``l = cap * tanh(z / cap)``, from ``u = 2 z / cap``.

    ``cap * tanh(z / cap) = 2 cap * sigmoid(u) - cap``: the CPU's sigmoid is ~4x faster than its
    tanh. Only ``sigmoid(u)`` and one log-normaliser per row are kept for the backward
    (autograd keeps the tanh and the log-softmax, two [N, V] tensors), which is then
    ``g (softmax(l) - onehot) 2 cap s (1 - s)`` in five in-place passes.
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, targets: Tensor, cap: float) -> Tensor:
        s = torch.sigmoid(u)
        logits = torch.add(s.new_tensor(-cap), s, alpha=2.0 * cap)
        logp = torch.log_softmax(logits, dim=-1)
        lse = logits[:, :1] - logp[:, :1]  # log sum exp of each row, [N, 1]
        ctx.save_for_backward(s, lse, targets)
        ctx.cap = cap
        return logp.gather(1, targets[:, None]).squeeze(1).neg_()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        s, lse, targets = ctx.saved_tensors
        cap = ctx.cap
        g = torch.add(lse.add(cap).neg_(), s, alpha=2.0 * cap).exp_()  # softmax(l)
        g.scatter_add_(1, targets[:, None], g.new_full((g.size(0), 1), -1.0))
        g.mul_(s).addcmul_(g, s, value=-1)  # * s (1 - s), in place: each element reads itself
        return g.mul_(grad.mul(2.0 * cap)[:, None]), None, None


def softcap_nats(u: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Per-row nats of ``targets`` [N] under the logits ``cap * tanh(z / cap)``, given float32
    ``u = 2 z / cap`` [N, V] (the head's matmul with its weight scaled by ``2 / cap``): equal,
    to float rounding, to ``F.cross_entropy(cap * tanh(z / cap), targets, reduction="none")``."""
    return _SoftcapNats.apply(u, targets, cap)


# Query rows per block of the chunked attention (below): measured fastest on an AVX-512-BF16
# CPU against 32 and 128 up to 512 positions, 128 beyond.
def _attention_chunk(seq_len: int) -> int:
    return 64 if seq_len <= 512 else 128


# Beyond this many positions the saved probabilities (T^2/2 per head) outgrow what the flash
# kernel's O(T) memory is worth trading for speed.
CHUNKED_ATTENTION_MAX_LEN = 1024


def _causal_bias(rows: int, start: int, keys: int, group: int, like: Tensor) -> Tensor:
    """Additive mask [rows * group, keys]: row ``r`` is query position ``start + r // group``
    (the ``group`` query heads of one KV head, interleaved), which sees keys up to itself."""
    position = torch.arange(rows * group, device=like.device) // group + start
    blocked = torch.arange(keys, device=like.device)[None, :] > position[:, None]
    return torch.zeros(blocked.shape, dtype=like.dtype, device=like.device).masked_fill_(
        blocked, float("-inf"))


def _to_rows(t: Tensor, kv_heads: int) -> Tensor:
    """[B, H, T, D] -> [B * H_kv, T * G, D]: for each KV head, its G query heads' rows ordered
    (position, head within the group), so that a block of positions is a block of rows."""
    B, H, T, D = t.shape
    return t.reshape(B, kv_heads, H // kv_heads, T, D).transpose(2, 3).reshape(
        B * kv_heads, T * (H // kv_heads), D)


def _from_rows(t: Tensor, batch: int, heads: int) -> Tensor:
    """The inverse of :func:`_to_rows`: [B * H_kv, T * G, D] -> [B, H, T, D]."""
    kv_heads = t.size(0) // batch
    G = heads // kv_heads
    T, D = t.size(1) // G, t.size(2)
    return t.view(batch, kv_heads, T, G, D).transpose(2, 3).reshape(batch, heads, T, D)


class _ChunkedCausalAttention(torch.autograd.Function):
    """Causal GQA attention as batched GEMMs over blocks of query rows.

    Each block of queries multiplies only the keys up to its last position (causal work, about
    half of the full T x T), its probabilities are kept in the inputs' dtype for the backward,
    and the ``G`` query heads sharing a KV head are stacked as rows of one GEMM (no K/V repeat).
    The scores and their softmax are (at least) float32, as in flash attention; the other GEMMs
    (P V and the backward's four) run in the inputs' dtype (bf16 with float32 sums, or float32).
    Autocast is off inside: the dtypes are the ones written here, whether or not the caller runs
    under autocast.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):  # the dtypes below, not autocast's
            return _ChunkedCausalAttention._forward(ctx, q, k, v)

    @staticmethod
    def _forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, H, T, D = q.shape
        Hk = k.size(1)
        G = H // Hk
        chunk = _attention_chunk(T)
        scale = 1.0 / math.sqrt(D)
        # float32 scores: exp() turns a score's absolute rounding error into its probability's
        # relative one (bf16's 2^-9 of a score of 10 is 2 %)
        wide = torch.promote_types(q.dtype, torch.float32)
        qw = _to_rows(q.to(wide) * scale, Hk)
        qs = qw.to(q.dtype)  # the backward's operand
        kf, vf = k.reshape(B * Hk, T, D), v.reshape(B * Hk, T, D)
        kw = kf.to(wide)
        outs, probs = [], []  # no out= arguments: torch.compile traces the loop whole
        for a in range(0, T, chunk):
            e = min(a + chunk, T)
            rows = slice(a * G, e * G)
            scores = torch.baddbmm(_causal_bias(e - a, a, e, G, qw), qw[:, rows],
                                   kw[:, :e].transpose(1, 2))
            p = scores.softmax(-1).to(q.dtype)
            probs.append(p)
            outs.append(torch.bmm(p, vf[:, :e]))
        ctx.save_for_backward(qs, kf, vf, *probs)
        ctx.geometry = (B, H, T, D, Hk, G, chunk, scale)
        return _from_rows(torch.cat(outs, dim=1), B, H)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.autocast(grad.device.type, enabled=False):
            return _ChunkedCausalAttention._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qs, kf, vf, *probs = ctx.saved_tensors
        B, H, T, D, Hk, G, chunk, scale = ctx.geometry
        g = _to_rows(grad, Hk)
        dqs = []
        # K and V gradients sum over query blocks: (at least) float32 accumulators, rounded once
        acc = torch.promote_types(kf.dtype, torch.float32)
        dk = torch.zeros(kf.shape, dtype=acc, device=kf.device)
        dv = torch.zeros(vf.shape, dtype=acc, device=vf.device)
        for p, a in zip(probs, range(0, T, chunk), strict=True):
            e = min(a + chunk, T)
            rows = slice(a * G, e * G)
            dv[:, :e] += torch.bmm(p.transpose(1, 2), g[:, rows])
            dp = torch.bmm(g[:, rows], vf[:, :e].transpose(1, 2))
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            dqs.append(torch.bmm(ds, kf[:, :e]))
            dk[:, :e] += torch.bmm(ds.transpose(1, 2), qs[:, rows])
        dq = _from_rows(torch.cat(dqs, dim=1).mul_(scale), B, H)
        return dq, dk.view(B, Hk, T, D).to(grad.dtype), dv.view(B, Hk, T, D).to(grad.dtype)


def chunked_attention_applies(q: Tensor, k: Tensor) -> bool:
    """Whether :func:`causal_attention` takes the chunked path for these inputs: on a CPU, bf16
    where it has bf16 instructions or float32 where its kernels are AVX-512 ones, a gradient to
    take (forward alone, SDPA's kernel is as fast or faster), and at most
    :data:`CHUNKED_ATTENTION_MAX_LEN` positions."""
    fast = ((q.dtype == torch.bfloat16 and _CPU_BF16_NATIVE)
            or (q.dtype == torch.float32 and _CPU_FP32_CHUNKED))
    return (q.device.type == "cpu" and fast
            and k.dtype == q.dtype and 1 < q.size(2) <= CHUNKED_ATTENTION_MAX_LEN
            and k.size(2) == q.size(2) and (recording(q) or recording(k)))


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal self-attention of ``q`` [B, H, T, hd] over ``k, v`` [B, H_kv, T, hd] (GQA).

    SDPA (flash attention on CUDA, and wherever no gradient is taken), except for training on
    a CPU where :func:`chunked_attention_applies`, where :class:`_ChunkedCausalAttention`
    computes it with batched GEMMs over about half the T x T work: in bf16 on an AVX-512-BF16
    AMD EPYC, forward and backward of ``small``'s attention (8 x 256 positions, 4/2 heads of
    64) ran 1.87x faster than SDPA's CPU flash kernel (which does the full T x T work at these
    lengths and gains nothing from bf16), 1.68x at 128 positions, 1.46x at 512, 1.10x at 1,024,
    with the same error against a float64 reference to within a factor of two (bf16 rounding);
    in float32 there, 1.39x at ``small``'s shape.
    """
    if chunked_attention_applies(q, k):
        return _ChunkedCausalAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                          enable_gqa=k.size(1) != q.size(1))
