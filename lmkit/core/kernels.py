"""Elementwise pieces of the trunk with hand-written backward passes.

Autograd differentiates RoPE and ReLU² op by op, one pass over the activations per op; these
compute the same values (bit for bit for ReLU², to float rounding for RoPE) in fewer passes,
which is most of a CPU training step that matmuls do not take. ``torch.compile`` traces them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


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


def relu2(h: Tensor) -> Tensor:
    """``relu(h) ** 2`` (the baseline's MLP activation)."""
    return _ReLU2.apply(h)
