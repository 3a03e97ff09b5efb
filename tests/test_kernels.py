"""The hand-written backward passes against autograd's op-by-op ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmkit.core import kernels
from lmkit.core.kernels import apply_rotary, linear, relu2, rms_norm, softcap_nats


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


def test_relu2_inplace_only_where_no_gradient_is_taken() -> None:
    """In place under no_grad/inference (the same bits as autograd's path); where autograd
    records, ``inplace`` is ignored and the input is left as it was."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(16, 40, generator=g)
    plain = F.relu(h).square()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            work = h.clone()
            out = relu2(work, inplace=True)
        assert out.data_ptr() == work.data_ptr() and torch.equal(out, plain)
    leaf = h.clone().requires_grad_()
    out = relu2(leaf, inplace=True)
    assert torch.equal(leaf.detach(), h) and torch.equal(out, plain) and out.requires_grad


def test_inference_logits_are_the_recorded_paths_to_float_rounding() -> None:
    """The soft-capped head's in-place inference path (``2 cap sigmoid(2 z / cap) - cap``)
    returns what the path autograd records (``cap tanh(z / cap)``) to float32 rounding, and is
    as close to the float64 soft cap: evaluation figures move by rounding only."""
    from lmkit.core.trunk import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, d_model=64, n_head=4, n_kv_head=2), 100, 0, 16)
    torch.nn.init.normal_(model.embed.weight, std=0.5)
    h = torch.randn(3, 16, 64, requires_grad=True)
    recorded = model.logits(h)
    assert recorded.requires_grad and recorded.abs().max() > 5  # the cap bends these
    with torch.inference_mode():
        inferred = model.logits(h.detach())
    cap = model.cfg.logit_softcap
    exact = cap * torch.tanh(h.detach().double() @ model.embed.weight.detach().double()[:100].T
                             / cap)
    step = cap * 2.0 ** -23  # float32's spacing at the cap
    torch.testing.assert_close(inferred, recorded.detach(), rtol=0, atol=8 * step)
    err = {name: (t.detach().double() - exact).abs().max().item()
           for name, t in (("recorded", recorded), ("inferred", inferred))}
    assert err["inferred"] <= 2 * err["recorded"] + 4 * step, err


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_eps_is_torchs_for_half_precision_inputs(dtype) -> None:
    """Rows whose mean square is near bf16's own eps (2^-7): F.rms_norm's eps there is
    float32's, and the training path (which evaluation follows with F.rms_norm) must agree to
    one rounding of the result, not differ by the eps (10 % on these rows)."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 64, generator=g) * torch.logspace(-3, 0, 6)[:, None]).to(dtype)
    mine = rms_norm(x.clone().requires_grad_())
    ref = _torch_rms(x)
    step = torch.finfo(dtype).eps  # one unit in the last place at magnitude 1
    assert (mine.detach().float() - ref.float()).abs().max() <= 2 * step * ref.float().abs().max()


def test_rms_norm_without_grad_is_torchs() -> None:
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(rms_norm(x), _torch_rms(x))


def _plain_softcap_nats(u: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
    logits = cap * torch.tanh(u * 0.5)  # u = 2 z / cap, so z / cap = u / 2
    return F.cross_entropy(logits, targets, reduction="none")


@pytest.mark.parametrize("cap", [30.0, 2.0])
def test_softcap_nats_matches_the_tanh_form_and_passes_gradcheck(cap: float) -> None:
    g = torch.Generator().manual_seed(2)
    u = (torch.randn(40, 17, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    targets = torch.randint(0, 17, (40,), generator=g)
    assert torch.autograd.gradcheck(lambda t: softcap_nats(t, targets, cap), (u,))
    grad = torch.rand(40, generator=g, dtype=torch.float64)
    mine = softcap_nats(u, targets, cap)
    plain = _plain_softcap_nats(u, targets, cap)
    torch.testing.assert_close(mine, plain)
    torch.testing.assert_close(torch.autograd.grad(mine, u, grad)[0],
                               torch.autograd.grad(plain, u, grad)[0])
    u32 = u.detach().float().requires_grad_()  # float32, as the trunk calls it
    torch.testing.assert_close(softcap_nats(u32, targets, cap),
                               _plain_softcap_nats(u32, targets, cap), atol=1e-5, rtol=1e-5)


def test_softcap_nats_of_no_rows_is_empty() -> None:
    u = torch.zeros(0, 5, requires_grad=True)
    out = softcap_nats(u, torch.zeros(0, dtype=torch.long), 30.0)
    assert out.shape == (0,)
    out.sum().backward()
    assert u.grad.shape == (0, 5)


def test_linear_under_cpu_bf16_autocast_is_a_bf16_gemm_with_float32_sums(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without bf16 instructions ``linear`` runs a float32 GEMM on bf16-rounded operands: the
    value of a bf16 GEMM with float32 accumulation, rounded to bf16, as autocast returns."""
    monkeypatch.setattr(kernels, "_CPU_BF16_NATIVE", False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 48, generator=g, requires_grad=True)
    w = torch.randn(32, 48, generator=g, requires_grad=True)
    b = torch.randn(32, generator=g, requires_grad=True)
    exact = (x.detach().bfloat16().double() @ w.detach().bfloat16().double().T
             + b.detach().bfloat16().double())
    grad = torch.randn(64, 32, generator=g)
    outs = {}
    for name, f in (("mine", linear), ("autocast", F.linear)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = f(x, w, b)
        assert y.dtype == torch.bfloat16
        outs[name] = (y, torch.autograd.grad(y, (x, w, b), grad.bfloat16()))
    y, grads = outs["mine"]
    one_ulp = exact.abs() * 2.0 ** -7  # one bf16 step at each value's scale
    assert ((y.double() - exact).abs() <= one_ulp).all()
    assert (y.double() == exact.bfloat16().double()).float().mean() > 0.98
    for mine, theirs in zip(grads, outs["autocast"][1], strict=True):
        assert mine.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))  # fp32: plain F.linear
    monkeypatch.setattr(kernels, "_CPU_BF16_NATIVE", True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))  # native bf16: autocast's own


def _qkv(B, H, Hk, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g, dtype=dtype).requires_grad_()
            for h in (H, Hk, Hk)]


# GQA and plain MHA, a length that is no multiple of the 64-row blocks, one past 512 (128-row
# blocks), a single block and two positions
ATTENTION_SHAPES = [(2, 4, 2, 256, 16), (1, 3, 3, 100, 8), (1, 2, 1, 520, 8), (2, 2, 1, 40, 8),
                    (1, 2, 2, 2, 4)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_chunked_causal_attention_is_exact_attention(shape) -> None:
    """In float64 the chunked form is causal attention itself (forward and every gradient to
    1e-10 of SDPA's math); gradcheck on a small case."""
    q, k, v = _qkv(*shape, torch.float64)
    grad = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    mine = kernels._ChunkedCausalAttention.apply(q, k, v)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=k.size(1) != q.size(1))
    torch.testing.assert_close(mine, plain, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(mine, (q, k, v), grad),
                    torch.autograd.grad(plain, (q, k, v), grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    small = _qkv(1, 2, 1, 7, 4, torch.float64, seed=3)
    assert torch.autograd.gradcheck(kernels._ChunkedCausalAttention.apply, tuple(small))


@pytest.mark.parametrize(("dtype", "slack"), [(torch.bfloat16, 2.0 ** -8),
                                              (torch.float32, 2.0 ** -22)])
def test_chunked_causal_attention_is_as_close_as_sdpas(dtype, slack) -> None:
    """bf16 and float32 inputs: against a float64 reference, the chunked form's output and
    gradients are within twice the error of SDPA's own kernel (plus half a step of the dtype at
    the largest value), dtypes kept."""
    q, k, v = _qkv(2, 4, 2, 192, 32, dtype, seed=5)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*exact, is_causal=True, enable_gqa=True)
    want = [ref, *torch.autograd.grad(ref, exact, grad.double())]
    results = {}
    for name, fn in (("chunked", kernels._ChunkedCausalAttention.apply),
                     ("sdpa", lambda *t: F.scaled_dot_product_attention(
                         *t, is_causal=True, enable_gqa=True))):
        y = fn(q, k, v)
        results[name] = [y, *torch.autograd.grad(y, (q, k, v), grad)]
    assert all(t.dtype == dtype for t in results["chunked"])
    for mine, theirs, exact_t in zip(results["chunked"], results["sdpa"], want, strict=True):
        err = (mine.double() - exact_t).abs().max().item()
        sdpa_err = (theirs.double() - exact_t).abs().max().item()
        assert err <= 2 * sdpa_err + exact_t.abs().max().item() * slack


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("avx512", [True, False])
def test_causal_attention_takes_the_chunked_path_where_it_is_faster(
        native: bool, avx512: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked for training in bf16 on a CPU with bf16 instructions and in float32 on an
    AVX-512 one; SDPA otherwise, for one position and without a gradient."""
    calls = []
    chunked = kernels._ChunkedCausalAttention.apply
    monkeypatch.setattr(kernels._ChunkedCausalAttention, "apply",
                        lambda *a: calls.append(a[0].dtype) or chunked(*a))
    monkeypatch.setattr(kernels, "_CPU_BF16_NATIVE", native)
    monkeypatch.setattr(kernels, "_CPU_FP32_CHUNKED", avx512)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _qkv(1, 2, 1, 16, 8, dtype)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                              is_causal=True, enable_gqa=True)
        torch.testing.assert_close(kernels.causal_attention(q, k, v).double(), want,
                                   rtol=2e-2, atol=2e-2)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _qkv(1, 2, 1, 1, 8, dtype)
        kernels.causal_attention(q, k, v)  # one position (a decoding step): SDPA
        q, k, v = _qkv(1, 2, 1, 16, 8, dtype)
        with torch.no_grad():  # no gradient to take (evaluation): SDPA's forward is as fast
            kernels.causal_attention(q, k, v)
    assert calls == [torch.float32] * avx512 + [torch.bfloat16] * native


def test_the_trunk_attends_through_the_chunked_path_where_it_applies(monkeypatch) -> None:
    """Under CPU bf16 autocast with bf16 instructions, every causal block of a training
    forward takes the chunked path, with logits as close to SDPA's as bf16 allows; packed
    documents (a mask), evaluation and decoding stay on SDPA."""
    from lmkit.core.trunk import Transformer
    from tests.test_trunk import randomize, tiny

    calls = []
    chunked = kernels._ChunkedCausalAttention.apply
    monkeypatch.setattr(kernels._ChunkedCausalAttention, "apply",
                        lambda *a: calls.append(a[0].shape[2]) or chunked(*a))
    torch.manual_seed(0)
    model = Transformer(tiny(), 50)
    randomize(model)
    idx = torch.randint(0, 50, (2, 24))
    logits = {}
    for native in (False, True):
        monkeypatch.setattr(kernels, "_CPU_BF16_NATIVE", native)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits[native] = model(idx)
    assert calls == [24] * len(model.blocks)
    torch.testing.assert_close(logits[True], logits[False], rtol=5e-2, atol=5e-2)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.forward_hidden(idx, segments=torch.zeros_like(idx))  # a mask: SDPA
        with torch.no_grad():
            model(idx)  # evaluation
            cache = model.new_cache(25)
            model(idx, cache=cache)  # a prompt
            model(idx[:, :1], cache=cache)  # one new token
    assert calls == []


def test_chunked_causal_attention_ignores_the_callers_autocast() -> None:
    """The trunk calls it under bf16 autocast: its float32 scores must stay float32 there (an
    autocast-cast baddbmm would round them to bf16), so the values are bit for bit the same
    with and without autocast, forward and backward."""
    q, k, v = _qkv(2, 4, 2, 150, 16, torch.bfloat16, seed=7)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).bfloat16()
    results = []
    for on in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            y = kernels._ChunkedCausalAttention.apply(q, k, v)
        results.append([y, *torch.autograd.grad(y, (q, k, v), grad)])
    for plain, autocast in zip(*results, strict=True):
        assert torch.equal(plain, autocast)
