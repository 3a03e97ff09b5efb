"""Reproducible Monte-Carlo draws: uniforms keyed per (seed, stream, row, sample), and the
any-order NELBO's draw of a mask set and its time."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmkit.core.masking.process import ESTIMATORS, LogLinearSchedule
from lmkit.errors import LmkitError

# -- reproducible draws --------------------------------------------------------------------------
RNG_DESCRIPTION = ("CPU torch.Generator per (row, sample), seeded with blake2b(seed, stream, "
                   "row, sample); float64 uniforms")


def draw_key(seed: int, stream: str, row: int, sample: int) -> int:
    """The 63-bit generator seed of sample ``sample`` of row ``row`` in ``stream``."""
    digest = hashlib.blake2b(f"lmkit-masking\0{seed}\0{stream}\0{row}\0{sample}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keyed_uniforms(seed: int, stream: str, rows: Sequence[int], samples: int, width: int,
                   device: torch.device | str = "cpu") -> Tensor:
    """float64 uniforms in [0, 1), ``[len(rows), samples, width]``: slice [i, k] depends only on
    (seed, stream, rows[i], k). Drawn on the CPU, so every device gets the same numbers."""
    out = torch.empty((len(rows), samples, width), dtype=torch.float64)
    gen = torch.Generator()
    for i, row in enumerate(rows):
        for k in range(samples):
            gen.manual_seed(draw_key(seed, stream, int(row), k))
            out[i, k].uniform_(generator=gen)
    return out.to(device)


def _log_binom_pmf(n: Tensor, k: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """log Binomial(k; n, p) in float64, broadcast; −inf where k > n (``log_q = log(1 − p)``)."""
    n, k = n.double(), k.double()
    ok = k <= n
    nk = torch.where(ok, n - k, torch.zeros_like(n - k))
    out = (torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(nk + 1)
           + k * log_p + nk * log_q)
    return torch.where(ok, out, torch.full_like(out, -math.inf))


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Index drawn from each row's (unnormalised, non-negative) ``weights`` with uniform ``u``."""
    cdf = weights.cumsum(dim=1)
    target = u.unsqueeze(1) * cdf[:, -1:]
    return (cdf <= target).sum(dim=1).clamp(max=weights.size(1) - 1)


def uniform_subset(u: Tensor, maskable: Tensor, n: Tensor) -> Tensor:
    """Exactly ``n[r]`` of row r's maskable positions, the set uniform among those of that size:
    the maskable positions holding the n smallest of ``u`` (i.i.d. uniforms)."""
    keys = torch.where(maskable, u, torch.full_like(u, 2.0))
    order = keys.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(u.size(1), device=u.device).expand_as(order).contiguous())
    return (rank < n.unsqueeze(1)) & maskable


@dataclass(frozen=True)
class AnyOrderTable:
    """The any-order law for rows with L maskable positions (see the module docstring).

    ``n_cdf[n-1]``: P(mask size ≤ n) under ρ's n-marginal (∝ P_n, or ∝ W_n for T steps).
    Continuous time: ``j_cdf[j] = P(Binomial(L, c) ≤ j)``, j = 0..L, for the draw of J given
    J ≥ n. T steps: ``i_cdf[n-1, i-1]`` = P(step ≤ i | n).
    """

    L: int
    n_cdf: Tensor
    j_cdf: Tensor | None = None
    i_cdf: Tensor | None = None


def any_order_table(L: int, sched: LogLinearSchedule, steps: int | None,
                    device: torch.device | str = "cpu") -> AnyOrderTable:
    """Exact float64 tables of the any-order law for one L (``L ≥ 1``)."""
    c = 1.0 - sched.eps
    Lt = torch.tensor(float(L), dtype=torch.float64, device=device)
    n = torch.arange(1, L + 1, dtype=torch.float64, device=device)
    if steps is None:
        j = torch.arange(L + 1, dtype=torch.float64, device=device)
        pmf = _log_binom_pmf(Lt, j, torch.tensor(math.log(c), dtype=torch.float64),
                             torch.tensor(math.log(sched.eps), dtype=torch.float64)).exp()
        tail = pmf.flip(0).cumsum(0).flip(0)          # tail[j] = P(Binomial(L, c) ≥ j)
        mass = tail[1:]                                # P_n, n = 1..L; Σ_n P_n = L·c
        cdf = mass.cumsum(0)
        return AnyOrderTable(L, cdf / cdf[-1], j_cdf=pmf.cumsum(0))
    i = torch.arange(1, steps + 1, dtype=torch.float64, device=device)
    m = c * i / steps
    w = (n.log()[:, None] - i.log()[None, :]
         + _log_binom_pmf(Lt, n[:, None], m.log()[None, :], torch.log1p(-m)[None, :])).exp()
    w_n = w.sum(dim=1)                                 # W_n; Σ_n W_n = L·c
    i_cdf = w.cumsum(dim=1) / w_n[:, None]
    cdf = w_n.cumsum(0)
    return AnyOrderTable(L, cdf / cdf[-1], i_cdf=i_cdf)


def _first_above(cdf: Tensor, target: Tensor) -> Tensor:
    """Per row, the first index whose (non-decreasing) ``cdf`` exceeds ``target``."""
    return (cdf <= target.unsqueeze(-1)).sum(dim=-1).clamp(max=cdf.size(-1) - 1)


def nelbo_draw(u: Tensor, v: Tensor, maskable: Tensor, sched: LogLinearSchedule, *,
               estimator: str, steps: int | None,
               tables: dict[int, AnyOrderTable] | None = None,
               within: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One draw per row of the NELBO estimators (see the module docstring).

    ``u``: ``[B, 2·seq + 2]`` float64 uniforms (one for the draw of J, or of the step, given n;
    seq+1 for exponentials; seq for the mask set); ``v`` ``[B]``: the stratified uniform (the mask
    size n for ``any_order``, the time for ``time``). Returns (masked positions, time input t,
    weight): the draw's value is ``weight · Σ_masked −log p(x₀ | x_t, cond(t))``, whose expectation
    is the row's NELBO without the prior term. Rows with nothing maskable get weight 0.
    ``tables`` caches :func:`any_order_table` per L across calls. ``within`` (a subset of
    ``maskable`` with at least n positions per row) draws the mask set uniformly from it instead:
    a uniform subset of a uniform set is a uniform set.
    """
    seq = maskable.size(1)
    dev = maskable.device
    c = 1.0 - sched.eps
    L = maskable.sum(dim=1)
    Lc = L.clamp(min=1)
    u_aux, u_exp, u_mask = u[:, 0], u[:, 1:seq + 2], u[:, seq + 2:]
    if estimator == "any_order":
        tables = {} if tables is None else tables
        n = torch.ones_like(L)
        t = torch.ones(L.shape, dtype=torch.float64, device=dev)
        for length in sorted({int(x) for x in Lc.tolist()}):
            rows = (Lc == length).nonzero().flatten()
            tab = tables.get(length)
            if tab is None:
                tab = tables[length] = any_order_table(length, sched, steps, dev)
            nr = _first_above(tab.n_cdf.expand(len(rows), -1), v[rows]) + 1
            ua = u_aux[rows]
            if steps is None:  # J ~ Binomial(L, c) given J ≥ n, then t ~ Beta(n, J − n + 1)
                cdf = tab.j_cdf.expand(len(rows), -1)
                below = cdf.gather(1, (nr - 1).unsqueeze(1)).squeeze(1)  # P(J ≤ n − 1)
                J = _first_above(cdf, below + ua * (1 - below)).clamp(min=nr)
                g = torch.cumsum(-torch.log1p(-u_exp[rows]), dim=1)  # partial sums of Exp(1)
                tr = (g.gather(1, (nr - 1).unsqueeze(1)) / g.gather(1, J.unsqueeze(1))).squeeze(1)
            else:              # the step given n
                tr = (_first_above(tab.i_cdf[nr - 1], ua) + 1).double() / steps
            n[rows], t[rows] = nr, tr
        weight = Lc.double() * c / n.double()         # value: L·(1−ε)·mean masked CE
    elif estimator == "time":
        if steps is None:
            t = 1.0 - v                               # uniform on (0, 1]
        else:
            t = ((v * steps).floor() + 1).clamp(max=steps) / steps
        m = c * t
        log_q = torch.log1p(-m)
        k = torch.arange(seq + 1, device=dev, dtype=torch.float64)
        pmf = _log_binom_pmf(Lc.unsqueeze(1), k, m.log().unsqueeze(1), log_q.unsqueeze(1)).exp()
        pmf[:, 0] = 0.0                               # conditioned on a non-empty mask set
        n = _inverse_cdf(pmf, u_aux)
        weight = -torch.expm1(Lc.double() * log_q) / t  # P(n ≥ 1) / t
    else:
        raise LmkitError(f"--opt estimator={estimator!r}: expected one of {', '.join(ESTIMATORS)}")
    weight = torch.where(L > 0, weight, torch.zeros_like(weight))
    return uniform_subset(u_mask, maskable if within is None else within, n), t, weight
