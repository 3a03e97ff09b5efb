"""entropy_bounded, block and ddpm's remasking on a fake denoiser with known logits.

The fake model's logits depend on the position only (a fixed table), so which positions a
sampler reveals, and when, can be computed independently here and compared call by call.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from lmkit.core.generate import SampleRequest, generate
from lmkit.core.masking import MaskedSpec
from lmkit.core.registry import get_registry
from lmkit.errors import LmkitError
from lmkit.protocols import TokenSpec

V, MASK, BOS = 16, 16, 0
SPEC = MaskedSpec(mask_id=MASK, vocab_size=V, bos_id=BOS, time_input=None)
EPS = SPEC.schedule.eps


class Fixed(torch.nn.Module):
    """A denoiser whose logits at position i are ``table[i]`` whatever the input; it records the
    input of every call."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.embed = torch.nn.Embedding(V + 2, 1)  # counted by the host's CallCounter
        self.table = table
        self.inputs: list[torch.Tensor] = []

    def forward_hidden(self, idx, cond=None):
        self.embed(idx)
        self.inputs.append(idx.clone())
        return torch.eye(self.table.size(0))[: idx.size(1)].expand(idx.size(0), -1, -1)

    def logits(self, h):
        return h @ self.table


def table(n: int, seed: int = 0) -> torch.Tensor:
    """Per position: one base distribution at its own sharpness, so entropies all differ."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(V, generator=gen)
    scale = torch.randperm(n, generator=gen).float() * 0.4 + 0.2
    return scale[:, None] * base[None, :]


def run(name: str, model: Fixed, *, num: int = 2, length: int, steps: int | None = None,
        seed: int = 0, options=None, **kw):
    entry = get_registry().get("sampler", name)
    objective = types.SimpleNamespace(name="fixed", spec=SPEC)
    out = generate(model, entry, objective=objective, tokens=TokenSpec(V, BOS),
                   prompt=torch.tensor([BOS]), context=length + 1,
                   request=SampleRequest(num=num, length=length, steps=steps or length,
                                         seed=seed, options=options, **kw))
    assert len(out) == 1
    return out[0]


def entropies(tab: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(tab.double(), -1)
    return -(logp.exp() * logp).sum(-1)


def reveals(model: Fixed, final: torch.Tensor) -> list[list[set[int]]]:
    """Per call, per row: the positions that call revealed (masked in its input, not after)."""
    states = [*model.inputs, final]
    return [[{int(i) for i in ((a[r] == MASK) & (b[r] != MASK)).nonzero().flatten()}
             for r in range(final.size(0))] for a, b in zip(states, states[1:], strict=False)]


# -- entropy_bounded -------------------------------------------------------------------------------
def test_entropy_bounded_a_huge_bound_reveals_everything_in_one_step():
    model = Fixed(table(13))
    out = run("entropy_bounded", model, length=12, options={"entropy_bound": 1e9})
    assert out["nfe"] == 1 and out["detail"]["steps"] == 1
    assert not (out["tokens"] == MASK).any()


def test_entropy_bounded_zero_reveals_one_per_step_lowest_entropy_first():
    tab = table(13)
    model = Fixed(tab)
    out = run("entropy_bounded", model, length=12, options={"entropy_bound": 0})
    assert out["nfe"] == 12
    order = (entropies(tab)[1:].argsort() + 1).tolist()  # generated positions, lowest first
    for row in range(2):
        revealed = [r[row] for r in reveals(model, out["tokens"])]
        assert all(len(s) == 1 for s in revealed)
        assert [s.pop() for s in revealed] == order


def test_entropy_bounded_reveals_what_the_bound_allows():
    tab = table(25, seed=3)
    h = entropies(tab)[1:].tolist()
    for bound in (0.5, 2.0, 6.0):
        model = Fixed(tab)
        out = run("entropy_bounded", model, length=24, options={"entropy_bound": bound})
        # independently: each step keeps the longest lowest-first prefix whose sum less its last
        # term is within the bound (at least one)
        left, expected = sorted(range(24), key=lambda i: h[i]), []
        while left:
            k = 1
            while k < len(left) and sum(h[i] for i in left[:k]) <= bound:
                k += 1
            expected.append({i + 1 for i in left[:k]})
            left = left[k:]
        assert out["nfe"] == len(expected) > 1
        assert [r[0] for r in reveals(model, out["tokens"])] == expected


def test_entropy_bounded_is_measured_on_the_filtered_distribution():
    model = Fixed(table(13))
    out = run("entropy_bounded", model, length=12, top_k=1, options={"entropy_bound": 0})
    assert out["nfe"] == 1  # top-k 1: every candidate is certain, entropy 0


def test_entropy_bounded_finishes_within_steps():
    tab = table(13)
    model = Fixed(tab)
    out = run("entropy_bounded", model, length=12, steps=3, options={"entropy_bound": 0})
    assert out["nfe"] == 3 and not (out["tokens"] == MASK).any()
    order = (entropies(tab)[1:].argsort() + 1).tolist()
    assert [r[1] for r in reveals(model, out["tokens"])] == [set(order[:4]), set(order[4:8]),
                                                             set(order[8:])]


# -- block -----------------------------------------------------------------------------------------
def test_block_never_reveals_past_the_current_block():
    model = Fixed(table(23))
    out = run("block", model, num=3, length=22, steps=11, options={"block_size": 8})
    # 3 blocks (8, 8, 6 tokens) share 11 steps as 4, 4, 3: every block takes all of its steps
    assert out["nfe"] == 11 and out["detail"]["blocks"] == 3
    blocks = [range(1, 9), range(9, 17), range(17, 23)]
    steps_of = [0] * 4 + [1] * 4 + [2] * 3
    for call, (x, revealed) in enumerate(zip(model.inputs, reveals(model, out["tokens"]),
                                             strict=True)):
        current = blocks[steps_of[call]]
        for row in range(3):
            masked = {i for i in range(1, 23) if x[row, i] == MASK}
            assert revealed[row] <= set(current)
            assert masked >= set(range(current.stop, 23))  # later blocks all masked
            assert not masked & set(range(1, current.start))  # earlier blocks complete
            assert len(revealed[row]) == 2  # 8 tokens over 4 steps, 6 over 3
    assert not (out["tokens"] == MASK).any()


def test_block_is_confidence_ordered_inside_the_block():
    tab = table(17, seed=5)
    model = Fixed(tab)
    out = run("block", model, length=16, steps=16, temperature=0.0, options={"block_size": 8})
    top = torch.softmax(tab.double(), -1).max(-1).values  # greedy: confidence = max probability
    for b, lo in enumerate((1, 9)):
        order = sorted(range(lo, lo + 8), key=lambda i: -float(top[i]))
        got = [r[0].pop() for r in reveals(model, out["tokens"])[8 * b:8 * (b + 1)]]
        assert got == order


def test_block_threshold_finishes_blocks_early():
    tab = table(17, seed=5)
    top = torch.softmax(tab.double(), -1).max(-1).values
    ranked = top[1:].sort().values
    p = float(ranked[7] + ranked[8]) / 2  # half the positions above it, none near it
    model = Fixed(tab)
    out = run("block", model, num=1, length=16, steps=16, temperature=0.0,
              options={"block_size": 8, "threshold": p})
    # independently: per block, the first step reveals the top one and every position above p;
    # each later step one more
    expected = sum(8 - max(1, sum(float(top[i]) > p for i in range(lo, lo + 8))) + 1
                   for lo in (1, 9))
    assert out["nfe"] == expected < 16
    assert not (out["tokens"] == MASK).any()


def test_block_options_are_checked():
    model = Fixed(table(13))
    with pytest.raises(LmkitError, match="--steps 2 is fewer than the 3 blocks"):
        run("block", model, length=12, steps=2, options={"block_size": 4})
    for bad, match in (({"block_size": 0}, "block_size=0"), ({"threshold": 0.0}, "threshold=0"),
                       ({"threshold": 1.5}, "threshold=1.5"),
                       ({"threshold": math.nan}, "threshold=nan")):
        with pytest.raises(LmkitError, match=match):
            run("block", model, length=12, options=bad)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(LmkitError, match="entropy_bound"):
            run("entropy_bounded", model, length=12, options={"entropy_bound": bad})
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(LmkitError, match="remask"):
            run("ddpm", model, length=12, options={"remask": bad})


# -- ddpm remasking --------------------------------------------------------------------------------
def reference_ddpm(model: Fixed, num: int, length: int, steps: int, seed: int, eta: float):
    """ddpm as documented, written out here: per step one float64 uniform per position decides
    the reveal (masked) or the ReMDM-cap re-mask (visible generated), then Gumbel-max draws for
    the revealed positions. Returns (tokens, positions re-masked)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.full((num, 1), BOS), torch.full((num, length), MASK)], dim=1)
    hidden = 0
    for i in range(steps, 0, -1):
        alpha_t, alpha_s = 1 - (1 - EPS) * i / steps, 1 - (1 - EPS) * (i - 1) / steps
        sigma = min(eta, (1 - alpha_s) / alpha_t)
        masked = x == MASK
        u = torch.rand(x.shape, generator=gen, dtype=torch.float64)
        reveal = masked & (u < (alpha_s - (1 - sigma) * alpha_t) / (1 - alpha_t))
        hide = ~masked & (u < sigma)
        hide[:, 0] = False
        if reveal.any():
            logp = torch.log_softmax(model.table[reveal.nonzero()[:, 1]].double(), -1)
            g = torch.rand(logp.shape, generator=gen, dtype=torch.float64)
            g = -torch.log(-torch.log(g.clamp(min=torch.finfo(torch.float64).tiny)))
            x[reveal] = (logp + g).argmax(-1)
        x[hide] = MASK
        hidden += int(hide.sum())
    return x, hidden


@pytest.mark.parametrize("steps", [12, 40])
def test_ddpm_without_remask_is_todays_ddpm_bit_for_bit(steps):
    model = Fixed(table(13))
    expected, _ = reference_ddpm(model, 3, 12, steps, seed=4, eta=0.0)
    for options in (None, {"remask": 0.0}):
        out = run("ddpm", model, num=3, length=12, steps=steps, seed=4, options=options)
        assert torch.equal(out["tokens"], expected)
        assert out["detail"] == {"steps": steps, "idle_steps": out["detail"]["idle_steps"]}


def test_remask_re_masks_as_an_independent_computation_does():
    model = Fixed(table(25))
    for seed, eta in ((0, 0.05), (1, 0.3)):
        expected, hidden = reference_ddpm(model, 4, 24, 60, seed=seed, eta=eta)
        out = run("ddpm", model, num=4, length=24, steps=60, seed=seed, options={"remask": eta})
        assert hidden > 0 and out["detail"]["remasked"] == hidden
        assert torch.equal(out["tokens"], expected)
        assert not (out["tokens"] == MASK).any()  # the last step reveals every masked token
        assert out["nfe"] == 60
        cached = run("ddpm_cache", model, num=4, length=24, steps=60, seed=seed,
                     options={"remask": eta})
        assert torch.equal(cached["tokens"], expected) and cached["nfe"] < 60
        assert cached["detail"]["remasked"] == hidden
