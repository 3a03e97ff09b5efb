"""The hand-written backward passes against autograd's op-by-op ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmkit.core.kernels import apply_rotary, relu2


def _plain_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def test_rotary_matches_autograd_and_passes_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(5, 4, generator=g, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin), (x,))
    grad = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    mine = torch.autograd.grad(apply_rotary(x, cos, sin), x, grad)[0]
    plain = torch.autograd.grad(_plain_rotary(x, cos, sin), x, grad)[0]
    torch.testing.assert_close(apply_rotary(x, cos, sin), _plain_rotary(x, cos, sin))
    torch.testing.assert_close(mine, plain)


def test_relu2_is_bitwise_autograds() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 33, generator=g, requires_grad=True)
    grad = torch.randn(64, 33, generator=g)
    mine = relu2(h)
    plain = F.relu(h).square()
    assert torch.equal(mine, plain)
    assert torch.equal(torch.autograd.grad(mine, h, grad)[0],
                       torch.autograd.grad(plain, h, grad)[0])
    h64 = h.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(relu2, (h64,))
