"""The absorbing-mask process and the likelihood estimators every masked denoiser shares.

Forward process: each maskable token is replaced by MASK independently with probability
``m(t) = 1 − α(t) = (1−ε)t`` (log-linear schedule ``α(t) = 1 − (1−ε)t``). Write ``c = 1 − ε``,
``L`` for the number of maskable positions of a row and, for a mask set S,
``f(S, t) = Σ_{i∈S} −log p(x₀ⁱ | x_S, cond(t))`` (``x_S``: the row with S masked; the model is
given ``cond(t)``). The continuous-time NELBO of a row is

    N = ∫₀¹ w(t) · E_{S ~ Bernoulli(m(t))^L}[ f(S, t) ] dt + L·ε·ln V,   w(t) = −α'/(1−α) = 1/t,

where ``L·ε·ln V`` is the prior term: at t = 1 a fraction ε of the tokens is still visible, so the
prior over x₁ must give them mass; with (1−ε)·MASK + ε·Uniform(V) the KL from q(x₁|x₀) is exactly
``ε·ln V`` per token. There is no reconstruction term (α(0) = 1). Writing
``E f(S,t) = L·m(t)·c̄(t)`` (c̄: the mean cross-entropy of a masked position) the integrand is
``g(t) = L·c·c̄(t)``, bounded, so the integral runs over all of [0, 1]: no t_min.

**Any-order form (the default estimator, ``any_order``).** Substitute m = c·t (dt/t = dm/m) and
split the expectation by the mask size n = |S| (n = 0 contributes nothing); given n, S is
uniform among the C(L, n) sets:

    N − Lε ln V = Σ_{n=1..L} ∫₀^c (1/m)·C(L,n)·mⁿ(1−m)^{L−n} · E_{S:|S|=n}[ f(S, m/c) ] dm.

Because ``C(L,n)·B(n, L−n+1) = 1/n``, ``(1/m)·C(L,n)mⁿ(1−m)^{L−n} = Beta(m; n, L−n+1) / n``.
With ``P_n = ∫₀^c Beta(m; n, L−n+1) dm = P(Binomial(L, c) ≥ n)`` (the regularised incomplete
beta function, summed exactly from the binomial pmf):

    N − Lε ln V = Σ_n P_n · E_{m ~ Beta(n, L−n+1) | m ≤ c} E_S[ f(S, m/c) / n ]
                = L · E_{n ~ U{1..L}} [ P_n · E[ f(S, m/c) / n ] ]                    (1)
                = L·c · E_{n ~ P_n / (L·c)} [ E[ f(S, m/c) / n ] ]                     (2)

(Σ_n P_n = E[Binomial(L, c)] = L·c). Form (2), used here, draws n with probability ∝ P_n
(nearly uniform: P_n ≈ 1 unless n is within a few of L), S a uniform set of n maskable
positions, the model's time input ``t = m/c`` with m from the posterior of the mask rate given n
(Beta(n, L−n+1), truncated at c: the schedule never masks more than c), and its value is
``L(1−ε) × (mean masked cross-entropy)``: a constant weight, so no heavy tails (the 1/t weight
puts weight up to 1/ε on rare draws that mask one token). The truncated Beta is drawn exactly:
m is the n-th smallest of L uniforms; ``m ≤ c`` iff J = #{uniforms ≤ c} ≥ n; J ~ Binomial(L, c)
conditioned on J ≥ n (inverse CDF of the exact pmf), and given J, ``t = m/c ~ Beta(n, J−n+1)``,
the ratio of the n-th to the (J+1)-th partial sum of i.i.d. exponentials. For a model that
ignores its time input, (1) is the any-order autoregressive expectation L·E_n[mean CE].

**T-step discrete bound.** With m_i = c·i/T, ``N_T = Σ_{i=1..T} (1/i)·E[f(S, i/T)] + Lε ln V``.
The same split gives ``N_T − Lε ln V = L·c·E_{n ~ W_n/(Lc)}[ E_{i ~ q_n}[f(S, i/T)/n] ]`` with
``W_n = Σ_i (n/i)·Binomial(n; L, m_i)`` (again Σ_n W_n = L·c) and ``q_n(i) ∝ (n/i)·Binomial(n;
L, m_i)``. Since ``(1/i)·E f(S, i/T) = (1/T)·g(i/T)``, the expectation of the T-step bound is the
right Riemann sum of the continuous integrand g: it lies above N (and within (g(1) − g(0))/T of
it) whenever the model's masked cross-entropy c̄(t) grows with the masking rate, as the exact
posterior's does; for an arbitrary model that is not guaranteed, and Monte-Carlo *estimates* can
cross anyway.

**Time form (``estimator=time``, for cross-checks).** t uniform on (0, 1] (continuous) or i
uniform on {1..T}; the mask set is drawn conditioned on being non-empty, which has probability
``P(n ≥ 1) = 1 − (1 − m)^L``, and the value is ``P(n ≥ 1)/t · f(S, t)``: the plain 1/t weight
times the exact probability of the event it is evaluated on, bounded by ``L·c``. It has the same
expectation N (resp. N_T) as the any-order form. (Before issue 13, ``nelbo_mc`` drew t ~ U[ε, 1]
with Bernoulli masks and a 1/(1−ε) normalisation: that estimated ``(1/(1−ε))∫_ε^1 g``, off by
≈ ε·(ḡ − g(0)), about ε relative, and its 1/t weight had heavy tails.)

**Variance reduction, exactly unbiased.** A draw's n comes from a uniform v through the
inverse CDF of n's law, and the S = K/R draws of a replicate are stratified in v. In the
any-order form they are also antithetic pairs: stratum s takes v, its mirror S−1−s takes 1 − v,
so the pair sees a small mask set A and a large one B (n_A ≤ n_B). B is drawn first; A is a
uniform subset of B (hence, marginally, a uniform set of its size) and its value gets the control
variate ``L(1−ε)·(mean_B CE_B − mean_{A} CE_B)``, where CE_B are B's cross-entropies: given B
and n_A its mean is exactly 0, and it cancels most of the noise of which few tokens A happened
to mask (the dominant variance of a small-n draw). Cost: still one model call per draw.

**Honest standard errors.** The K = ``samples`` draws of a row form R = ``replicates``
independent replicates of that design (every replicate has its own uniforms). A row's estimate
is the mean of its replicates and its variance the replicates' sample variance / R: unbiased,
because replicates share nothing. Rows are independent of each other, so variances add.

**Reproducible draws.** Every random number of sample k of row r comes from a CPU
``torch.Generator`` seeded with a hash of (seed, stream, r, k) (``stream`` names the metric and
estimator): a row's value depends only on the row, the seed and the model, never on the batch
size, the validation prefix length or the device.

**Chain rule.** Revealing the positions of a row in a fixed order, a group per model call, and
coding each group with the model's factorised marginals given exactly the positions revealed in
earlier calls is a normalised distribution over the row, hence an exact code length. The default
order is strided (call j reveals positions j, j+s, j+2s, …): each call's tokens are far apart,
so factorising them costs little.

Everything here takes a :class:`MaskedSpec` so built-in and third-party masked objectives share it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmkit.core.bpb import Metric
from lmkit.errors import LmkitError

ESTIMATORS = ("any_order", "time")
CHAIN_ORDERS = ("strided", "left_to_right")


@dataclass(frozen=True)
class LogLinearSchedule:
    """``α(t) = 1 − (1−ε)t``: the MDLM schedule; its ELBO weight is exactly ``1/t``."""

    eps: float = 1e-3

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - (1 - self.eps) * t

    def mask_prob(self, t: Tensor) -> Tensor:
        return (1 - self.eps) * t

    def sigma(self, t: Tensor) -> Tensor:
        """Total noise ``−log α(t)``: what MDLM-style models are conditioned on."""
        return -torch.log(self.alpha(t))

    def weight(self, t: Tensor) -> Tensor:
        """``−α'(t) / (1 − α(t))``, computed from the schedule (equals 1/t)."""
        return (1 - self.eps) / self.mask_prob(t)

    def prior_nats_per_token(self, vocab_size: int) -> float:
        """KL(q(x₁|x₀) ‖ (1−α₁)·MASK + α₁·Uniform(V)) per token = α(1)·ln V."""
        return self.eps * math.log(vocab_size)


@dataclass(frozen=True)
class MaskedSpec:
    """What an objective tells the shared machinery about its tokens and its model's input."""

    mask_id: int
    vocab_size: int
    bos_id: int
    pad_id: int | None = None
    schedule: LogLinearSchedule = LogLinearSchedule()
    time_input: str | None = "sigma"  # what the model is conditioned on: "sigma", "t" or None
    anchor_bos: bool = False           # BOS is never masked (a given document anchor)
    documents: bool = False            # rows never cross a document start (PAD fills the rest)

    def cond(self, t: Tensor) -> Tensor | None:
        if self.time_input is None:
            return None
        return self.schedule.sigma(t) if self.time_input == "sigma" else t


def free_information(spec: MaskedSpec) -> list[str]:
    """What a masked model is given that the AR ``nll`` protocol makes its model pay for.

    ``bos_anchor``: BOS tokens are never masked: they are context, not scored (AR scores them).
    ``document_boundaries``: rows stop at the next document's start and PAD fills the rest, so the
    model is told where every document starts and how long it is. Empty: the masked metrics score
    exactly the AR ``nll`` targets with nothing extra given.
    """
    return [name for name, on in (("bos_anchor", spec.anchor_bos),
                                  ("document_boundaries", spec.documents)) if on]


def stratified_times(n: int, t_min: float, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Tensor:
    """n times covering [t_min, 1] in equal strata with one shared uniform offset.

    Antithetic/stratified sampling for *training*: the batch always spans the whole schedule,
    which removes most of the variance a batch of i.i.d. times would add to the loss.
    """
    u = torch.rand((), generator=generator, device=device)
    k = torch.arange(n, device=device, dtype=torch.float32)
    return t_min + (1 - t_min) * (k + u) / n


def mask_tokens(x0: Tensor, mask_prob: Tensor, maskable: Tensor, mask_id: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Absorbing forward process: returns (x_t, masked); ``mask_prob`` is one value per row."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = (u < mask_prob.unsqueeze(-1)) & maskable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def document_segments(x0: Tensor, spec: MaskedSpec) -> Tensor | None:
    """The document of each position of a packed row (None outside document mode).

    Document mode packs a window's documents into one row, each attending only to itself
    (``Transformer.forward_hidden(segments=...)``): no token sees another document and no slot
    is padding. A BOS starts a new segment.
    """
    if not spec.documents:
        return None
    return torch.cumsum((x0 == spec.bos_id).int(), dim=1)


def padding_share(x0: Tensor, spec: MaskedSpec) -> float:
    """The share of row slots PAD would fill if rows stopped at the next document's start
    instead of packing documents (what document mode cost before packing; for benchmarks)."""
    is_bos = x0 == spec.bos_id
    is_bos[:, 0] = False
    return float((torch.cumsum(is_bos.int(), dim=1) > 0).float().mean())


def masked_spec(tokens: Any, eps: float, time_input: str | None, anchor_bos: bool,
                documents: bool) -> MaskedSpec:
    """The spec of an objective whose special tokens include ``MASK`` and ``PAD``."""
    if not 0 < eps < 1:
        raise LmkitError(f"options.eps must be in (0, 1), got {eps}")
    return MaskedSpec(
        mask_id=tokens["MASK"], vocab_size=tokens.vocab_size, bos_id=tokens.bos_id,
        pad_id=tokens["PAD"], schedule=LogLinearSchedule(eps), time_input=time_input,
        anchor_bos=anchor_bos, documents=documents,
    )


def training_rows(batch: Any, spec: MaskedSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, maskable positions) from a batch of stream windows. In document mode the row is
    packed (see :func:`document_segments`): every position is a real token."""
    x0 = batch.tokens[:, 1:]
    maskable = x0 != spec.bos_id if spec.anchor_bos else torch.ones_like(x0, dtype=torch.bool)
    return x0, maskable


def masked_nats(model: torch.nn.Module, xt: Tensor, x0: Tensor, masked: Tensor,
                cond: Tensor | None, segments: Tensor | None = None) -> Tensor:
    """−log p(x₀ | x_t) at masked positions (0 elsewhere), float32, shape of x0.

    Only masked positions go through the output head: at t≈0.5 that halves its cost.
    ``segments``: attention stays within each segment (packed documents).
    """
    hidden = (model.forward_hidden(xt, cond) if segments is None
              else model.forward_hidden(xt, cond, segments=segments))
    out = torch.zeros(x0.shape, device=x0.device, dtype=torch.float32)
    if masked.any():
        logits = model.logits(hidden[masked])
        out[masked] = F.cross_entropy(logits.float(), x0[masked], reduction="none")
    return out


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


# -- evaluation rows -----------------------------------------------------------------------------
@dataclass
class EvalRows:
    """Validation targets laid out as rows the model sees.

    ``positions[r, j]`` is the index into the validation stream of row r's j-th token (-1 for
    padding). Every scored target appears exactly once. Row r is the same for every validation
    prefix that holds it whole, so per-row keyed draws make its value prefix-independent.
    """

    positions: Tensor
    unscored_tail: int

    def __len__(self) -> int:
        return self.positions.size(0)

    def padding(self) -> int:
        """Row slots that hold no target (document mode: the tail of each document's last row)."""
        return int((self.positions < 0).sum())


def eval_rows(val: Tensor, seq_len: int, spec: MaskedSpec) -> EvalRows:
    """Contiguous windows (the AR ``nll`` protocol's targets), or whole-document chunks."""
    n_targets = val.numel() - 1
    if not spec.documents:
        n_rows = n_targets // seq_len
        if n_rows == 0:
            raise LmkitError(f"the validation prefix has {n_targets} targets, fewer than one "
                             f"window of seq_len={seq_len}; raise --max-tokens")
        pos = 1 + torch.arange(n_rows * seq_len).view(n_rows, seq_len)
        return EvalRows(pos, n_targets - n_rows * seq_len)
    starts = (val[1:] == spec.bos_id).nonzero().flatten() + 1
    bounds = [1, *[int(s) for s in starts if s > 1], n_targets + 1]
    rows = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        for c in range(a, b, seq_len):
            row = torch.full((seq_len,), -1, dtype=torch.long)
            row[: min(seq_len, b - c)] = torch.arange(c, min(c + seq_len, b))
            rows.append(row)
    return EvalRows(torch.stack(rows), 0)


@dataclass
class RowBatch:
    x0: Tensor        # model input ids (PAD where invalid)
    prev: Tensor      # the stream token before each target (for byte counting)
    prev2: Tensor     # two back (-1 where none)
    valid: Tensor     # real target positions
    maskable: Tensor  # positions the forward process may mask (= scored)
    start: int = 0    # index of the batch's first row among all rows
    segments: Tensor | None = None  # document mode: 0 = the document, 1 = its PAD tail

    def nats(self, model: torch.nn.Module, xt: Tensor, masked: Tensor,
             cond: Tensor | None) -> Tensor:
        """:func:`masked_nats` of this batch's rows (the document attends only to itself)."""
        return masked_nats(model, xt, self.x0, masked, cond, self.segments)


def row_batches(val: Tensor, rows: EvalRows, spec: MaskedSpec, batch_size: int,
                device: torch.device) -> Iterator[RowBatch]:
    padded = torch.cat([torch.tensor([-1, -1]), val])  # index i+2 holds val[i]
    pad = spec.pad_id if spec.pad_id is not None else spec.mask_id
    for b in range(0, len(rows), batch_size):
        pos = rows.positions[b:b + batch_size]
        valid = pos >= 0
        safe = pos.clamp(min=0)
        x0 = torch.where(valid, padded[safe + 2], torch.full_like(pos, pad))
        prev, prev2 = padded[safe + 1], padded[safe]
        maskable = valid & ~((x0 == spec.bos_id) if spec.anchor_bos else torch.zeros_like(valid))
        segments = (~valid).long().to(device) if spec.documents else None
        yield RowBatch(*(t.to(device) for t in (x0, prev, prev2, valid, maskable)), start=b,
                       segments=segments)


# -- estimators --------------------------------------------------------------------------------
def row_bytes(ctx: Any, rb: RowBatch) -> Tensor:
    """Exact LUT bytes of each row's scored (maskable) targets."""
    prev = torch.where(rb.valid, rb.prev, torch.zeros_like(rb.prev))
    prev2 = torch.where(rb.valid, rb.prev2, torch.full_like(rb.prev2, -1))
    per_pos = ctx.lut.target_bytes(rb.x0.clamp(max=ctx.lut.size - 1), prev, prev2)
    return (per_pos * rb.maskable).sum(dim=1)


def common_detail(spec: MaskedSpec, rows: EvalRows) -> dict[str, Any]:
    """What every masked metric's value depends on besides the model and the estimator."""
    return {
        "sequences": len(rows), "seq_len": rows.positions.size(1),
        "free_information": free_information(spec), "bos_given": spec.anchor_bos,
        "documents": spec.documents, "padding_slots": rows.padding(),
        "unscored_tail_tokens": rows.unscored_tail,
    }


@dataclass
class RowEstimates:
    """Per-row NELBO estimates (nats, prior included), their variances, bytes and tokens, and
    the per-replicate row estimates ``[rows, R]`` that paired comparisons need (CPU)."""

    nats: Tensor
    var: Tensor
    bytes: Tensor
    tokens: Tensor
    replicates: Tensor


def check_design(samples: int, replicates: int) -> int:
    """The number of strata of K = ``samples`` draws split into ``replicates`` replicates."""
    if replicates < 2:
        raise LmkitError("--opt replicates must be at least 2: a standard error needs "
                         "independent replicates")
    if samples < replicates or samples % replicates:
        raise LmkitError(f"--opt samples={samples} must be a multiple of --opt "
                         f"replicates={replicates} (K draws = replicates × strata)")
    return samples // replicates


def replicate_mean_var(values: Tensor, replicates: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: the mean of ``values`` ``[B, R·S]`` (replicate r = columns r·S .. r·S+S-1), the
    variance of that mean from the R replicate means, and those means ``[B, R]``. Explicit
    element-wise sums, so each row's result is bit-identical whatever the rows beside it."""
    strata = values.size(1) // replicates
    reps = []
    for r in range(replicates):
        acc = values[:, r * strata]
        for s in range(1, strata):
            acc = acc + values[:, r * strata + s]
        reps.append(acc / strata)
    mean = reps[0]
    for rep in reps[1:]:
        mean = mean + rep
    mean = mean / replicates
    ss = (reps[0] - mean) ** 2
    for rep in reps[1:]:
        ss = ss + (rep - mean) ** 2
    return mean, ss / (replicates - 1) / replicates, torch.stack(reps, dim=1)


def draw_plan(strata: int, paired: bool) -> list[tuple[int, int | None]]:
    """The draws of one replicate: (low stratum, its mirror) antithetic pairs, or singles.

    Stratum s covers v ∈ [s/S, (s+1)/S); its mirror S−1−s gets 1 − v. Paired only where
    ``paired`` (the any-order form, whose mask size is monotone in v); an odd middle stratum,
    or every stratum when unpaired, is a single draw with its own uniform.
    """
    if not paired:
        return [(s, None) for s in range(strata)]
    plan: list[tuple[int, int | None]] = [(s, strata - 1 - s) for s in range(strata // 2)]
    if strata % 2:
        plan.append((strata // 2, None))
    return plan


def nelbo_rows(model: torch.nn.Module, ctx: Any, spec: MaskedSpec, rows: EvalRows, *,
               samples: int, steps: int | None, seed: int, stream: str,
               estimator: str = "any_order", replicates: int = 2,
               on_batch: Callable[[], None] = lambda: None) -> RowEstimates:
    """Per-row Monte-Carlo NELBO (continuous, or T=``steps``) with an unbiased variance.

    One model call per (batch, sample): the cost of K = ``samples`` draws per row is what it was
    for the 1/t estimator; the draws are keyed per (seed, stream, row, sample).
    """
    if estimator not in ESTIMATORS:
        raise LmkitError(f"--opt estimator={estimator!r}: expected one of {', '.join(ESTIMATORS)}")
    strata = check_design(samples, replicates)
    sched = spec.schedule
    prior = sched.prior_nats_per_token(spec.vocab_size)
    seq = rows.positions.size(1)
    out = RowEstimates(*(torch.zeros(len(rows), dtype=d) for d in
                         (torch.float64, torch.float64, torch.long, torch.long)),
                       replicates=torch.zeros(len(rows), replicates, dtype=torch.float64))
    tables: dict[int, AnyOrderTable] = {}
    plan = draw_plan(strata, paired=estimator == "any_order")
    for rb in row_batches(ctx.val_tokens, rows, spec, ctx.batch_size, ctx.device):
        n = rb.x0.size(0)
        ids = range(rb.start, rb.start + n)
        u = keyed_uniforms(seed, stream, ids, samples, 2 * seq + 3, ctx.device)
        values = torch.empty(n, samples, dtype=torch.float64, device=ctx.device)

        def draw(k: int, v: Tensor, within: Tensor | None = None, rb: RowBatch = rb,
                 u: Tensor = u) -> tuple[Tensor, Tensor, Tensor]:
            masked, t, weight = nelbo_draw(u[:, k, 1:], v, rb.maskable, sched,
                                           estimator=estimator, steps=steps, tables=tables,
                                           within=within)
            xt = torch.where(masked, torch.full_like(rb.x0, spec.mask_id), rb.x0)
            with ctx.autocast():
                nats = rb.nats(model, xt, masked, spec.cond(t.float())).double()
            return masked, nats, weight

        for r in range(replicates):
            base = r * strata
            for low, high in plan:
                v = (low + u[:, base + low, 0]) / strata
                if high is None:
                    _, nats, weight = draw(base + low, v)
                    values[:, base + low] = nats.sum(dim=1) * weight
                    continue
                # antithetic pair: the high draw (1 − v) first, then the low one (v) masks a
                # uniform subset of the high one's mask set; its control variate, the high
                # draw's cross-entropy on that subset minus on the whole set, has mean zero
                masked_b, nats_b, weight_b = draw(base + high, 1.0 - v)
                value_b = nats_b.sum(dim=1) * weight_b
                masked_a, nats_a, weight_a = draw(base + low, v, within=masked_b)
                control = torch.where(masked_a, nats_b, torch.zeros_like(nats_b)).sum(dim=1)
                values[:, base + high] = value_b
                values[:, base + low] = (nats_a.sum(dim=1) - control) * weight_a + value_b
        mean, var, reps = replicate_mean_var(values, replicates)
        tokens = rb.maskable.sum(dim=1)
        out.nats[ids.start:ids.stop] = (mean + prior * tokens.double()).cpu()
        out.replicates[ids.start:ids.stop] = (reps + prior * tokens.double()[:, None]).cpu()
        out.var[ids.start:ids.stop] = var.cpu()
        out.bytes[ids.start:ids.stop] = row_bytes(ctx, rb).cpu()
        out.tokens[ids.start:ids.stop] = tokens.cpu()
        on_batch()
    return out


def monte_carlo_nelbo(model: torch.nn.Module, ctx: Any, spec: MaskedSpec, rows: EvalRows, *,
                      samples: int, steps: int | None, seed: int, name: str,
                      estimator: str = "any_order", replicates: int = 2,
                      on_batch: Callable[[], None] = lambda: None) -> Metric:
    """NELBO in bits per byte with an honest standard error (see the module docstring).

    ``steps=None``: the continuous-time NELBO (t over all of [0, 1]); ``steps=T``: the T-step
    discrete bound. The sums over rows run in row order once at the end, so the value is
    identical for any batch size.
    """
    if samples < 2:
        raise LmkitError("the Monte-Carlo NELBO needs --opt samples>=2 for a standard error")
    if estimator not in ESTIMATORS:
        raise LmkitError(f"--opt estimator={estimator!r}: expected one of {', '.join(ESTIMATORS)}")
    check_design(samples, replicates)
    sched = spec.schedule
    stream = f"{name}/{estimator}"
    meter = ctx.meter(name, "upper_bound", {
        "estimator": (f"{'continuous-time NELBO' if steps is None else f'{steps}-step NELBO'}, "
                      + ("any-order form: n ~ P_n, time from its posterior given n"
                         if estimator == "any_order" else
                         "time form: t ~ U(0,1], non-empty mask sets, weight P(n>=1)/t")),
        "form": estimator,
        "weight": ("L(1-eps) per mean masked cross-entropy" if estimator == "any_order"
                   else "P(n>=1)/t per masked cross-entropy sum"),
        "design": (f"{replicates} independent replicates x {samples // replicates} strata in v"
                   + (" (antithetic pairs v, 1-v; the small mask set a uniform subset of the "
                      "large one, with a mean-zero control variate)"
                      if estimator == "any_order" and samples // replicates > 1 else "")),
        "schedule": f"log-linear, eps={sched.eps}", "steps": steps,
        "samples_per_sequence": samples, "replicates": replicates,
        "strata": samples // replicates,
        "stderr_method": "unbiased: variance between independent replicates per sequence, "
                         "summed over sequences",
        "seed": seed, "rng": RNG_DESCRIPTION, "stream": stream,
        "time_input": spec.time_input,
        "prior_nats_per_token": sched.prior_nats_per_token(spec.vocab_size),
        **common_detail(spec, rows),
    })
    est = nelbo_rows(model, ctx, spec, rows, samples=samples, steps=steps, seed=seed,
                     stream=stream, estimator=estimator, replicates=replicates,
                     on_batch=on_batch)
    meter.add_estimate(est.nats, est.var, est.bytes, est.tokens)
    metric = meter.metric()
    metric.units = est.replicates  # for the paired stderr of a difference (lmkit compare)
    return metric


def chain_groups(seq: int, k: int, order: str, device: torch.device | str = "cpu"
                 ) -> tuple[Tensor, int]:
    """(group of each column, number of groups): call j reveals the columns of group j."""
    if k < 1:
        raise LmkitError("--opt chain_k must be at least 1")
    calls = math.ceil(seq / k)
    col = torch.arange(seq, device=device)
    if order == "strided":
        return col % calls, calls
    if order == "left_to_right":
        return col // k, calls
    raise LmkitError(f"--opt chain_order={order!r}: expected one of {', '.join(CHAIN_ORDERS)}")


def chain_rule_nats(model: torch.nn.Module, spec: MaskedSpec, x0: Tensor, maskable: Tensor, *,
                    k: int, order: str = "strided",
                    autocast: Callable[[], Any] | None = None,
                    segments: Tensor | None = None) -> Tensor:
    """Per-position code length (nats; 0 where not maskable) of the chain rule over each row.

    Call j masks every maskable position of groups ≥ j and scores group j: each position is
    predicted from exactly the positions revealed by earlier calls (plus the unmaskable ones,
    always visible). The time input is the one whose mask rate matches the hidden fraction,
    ``t = hidden / (L(1−ε))`` (at most 1).
    """
    group, calls = chain_groups(x0.size(1), k, order, x0.device)
    sched = spec.schedule
    n_maskable = maskable.sum(dim=1).clamp(min=1).float()
    out = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
    for j in range(calls):
        hidden = maskable & (group >= j)
        block = hidden & (group == j)
        if not block.any():
            continue
        xt = torch.where(hidden, torch.full_like(x0, spec.mask_id), x0)
        t = (hidden.sum(dim=1).float() / n_maskable / (1 - sched.eps)).clamp(sched.eps, 1.0)
        with autocast() if autocast is not None else contextlib.nullcontext():
            nats = masked_nats(model, xt, x0, block, spec.cond(t), segments)
        out = out + torch.where(block, nats, torch.zeros_like(nats))
    return out


def chain_rule(model: torch.nn.Module, ctx: Any, spec: MaskedSpec, rows: EvalRows, *, k: int,
               order: str = "strided", name: str = "chain_rule",
               on_batch: Callable[[], None] = lambda: None) -> Metric:
    """Exact code length: reveal the row in ``ceil(seq/k)`` model calls of at most k tokens,
    each coded with the model's factorised marginals given the earlier calls' tokens. A
    normalised distribution over each row, hence ``kind: exact``."""
    seq = rows.positions.size(1)
    _, calls = chain_groups(seq, k, order)
    meter = ctx.meter(name, "exact", {
        "estimator": "chain rule, factorised marginals within each call",
        "order": order, "order_rule": ("call j reveals positions j, j+s, j+2s, ... "
                                       f"(s = {calls})" if order == "strided" else
                                       "call j reveals positions jk .. jk+k-1"),
        "tokens_per_call": k, "calls_per_sequence": calls,
        "time_input": "t = hidden/(L(1-eps)), clamped to [eps, 1]",
        **common_detail(spec, rows),
    })
    for rb in row_batches(ctx.val_tokens, rows, spec, ctx.batch_size, ctx.device):
        nats = chain_rule_nats(model, spec, rb.x0, rb.maskable, k=k, order=order,
                               autocast=ctx.autocast, segments=rb.segments)
        meter.add(nats, rb.x0, rb.prev, rb.maskable, prev2=rb.prev2)
        on_batch()
    return meter.metric()


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    except ValueError:
        raise LmkitError(f"--opt steps={text!r}: expected comma-separated integers, "
                         f"e.g. steps=128,512") from None
    if any(s < 1 for s in steps):
        raise LmkitError("--opt steps: every T must be at least 1")
    return steps


@dataclass
class MaskedEvalOptions:
    """``lmkit eval --opt key=value`` options of masked-denoiser objectives."""

    samples: int = 4             # K draws per sequence for the Monte-Carlo NELBOs (model calls)
    replicates: int = 2          # independent replicates among the K (stderr); K/replicates strata
    estimator: str = "any_order"  # "any_order" (bounded weights) or "time" (the 1/t form)
    steps: str = "128,512"       # T of the discrete-time bounds ("" = none)
    chain_k: int = 32            # tokens revealed per model call in chain_rule (0 = off)
    chain_order: str = "strided"  # "strided" (call j: positions j, j+s, ...) or "left_to_right"


def evaluate_masked(model: torch.nn.Module, ctx: Any, spec: MaskedSpec) -> list[Metric]:
    """The likelihood metrics every masked denoiser gets, over one set of rows (same tokens)."""
    opts: MaskedEvalOptions = ctx.options
    rows = eval_rows(ctx.val_tokens, ctx.seq_len, spec)
    if ctx.purpose == "validation":
        return [monte_carlo_nelbo(model, ctx, spec, rows, samples=2, steps=None,
                                  seed=ctx.seed, name="nelbo_mc")]
    if opts.estimator not in ESTIMATORS:
        raise LmkitError(f"--opt estimator={opts.estimator!r}: expected one of "
                         f"{', '.join(ESTIMATORS)}")
    check_design(opts.samples, opts.replicates)
    if opts.chain_k:
        chain_groups(ctx.seq_len, opts.chain_k, opts.chain_order)  # fail before any work
    steps = parse_steps(opts.steps)
    n_batches = math.ceil(len(rows) / ctx.batch_size)
    total = n_batches * (1 + len(steps) + (1 if opts.chain_k else 0))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        ctx.progress(done, total)

    mc = {"samples": opts.samples, "seed": ctx.seed, "estimator": opts.estimator,
          "replicates": opts.replicates, "on_batch": tick}
    metrics = [monte_carlo_nelbo(model, ctx, spec, rows, steps=None, name="nelbo_mc", **mc)]
    for T in steps:
        metrics.append(monte_carlo_nelbo(model, ctx, spec, rows, steps=T, name=f"nelbo_T{T}",
                                         **mc))
    if opts.chain_k:
        metrics.append(chain_rule(model, ctx, spec, rows, k=opts.chain_k,
                                  order=opts.chain_order, on_batch=tick))
    return metrics
