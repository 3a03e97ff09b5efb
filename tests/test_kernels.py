"""The hand-written backward passes against autograd's op-by-op ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmkit.core.kernels import apply_rotary, relu2, rms_norm


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


def _torch_rms(x):
    return F.rms_norm(x, (x.size(-1),))


def test_rms_norm_passes_gradcheck() -> None:
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64,
                    requires_grad=True)
    assert torch.autograd.gradcheck(rms_norm, (x,))


# (an all-zero row is fp32 only: PyTorch's own bf16 backward uses another eps than its forward)
@pytest.mark.parametrize(("layout", "dtype"), [
    ("contiguous", torch.float32), ("transposed", torch.float32), ("zero_rows", torch.float32),
    ("contiguous", torch.bfloat16), ("transposed", torch.bfloat16)])
def test_rms_norm_matches_torch(layout, dtype) -> None:
    """Values and input gradients of F.rms_norm (same eps), whatever the memory layout; an
    all-zero row (rms 0) stays finite, as it does in PyTorch."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 16, generator=g)
    if layout == "transposed":
        x = x.transpose(1, 2)
    if layout == "zero_rows":
        x[0, 1] = 0.0
    x = x.to(dtype).requires_grad_()
    grad = torch.randn(x.shape, generator=g).to(dtype)
    mine, ref = rms_norm(x), _torch_rms(x)
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(mine, ref, **tol)
    torch.testing.assert_close(torch.autograd.grad(mine, x, grad)[0],
                               torch.autograd.grad(ref, x, grad)[0], **tol)
    assert mine.dtype == dtype and torch.isfinite(mine).all()


def test_rms_norm_without_grad_is_torchs() -> None:
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(rms_norm(x), _torch_rms(x))
