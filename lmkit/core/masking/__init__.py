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

from lmkit.core.masking.chain import (  # noqa: F401
    chain_groups,
    chain_rule,
    chain_rule_nats,
)
from lmkit.core.masking.draws import (  # noqa: F401
    RNG_DESCRIPTION,
    AnyOrderTable,
    _first_above,
    _inverse_cdf,
    _log_binom_pmf,
    any_order_table,
    draw_key,
    keyed_uniforms,
    nelbo_draw,
    uniform_subset,
)
from lmkit.core.masking.evaluate import (  # noqa: F401
    MaskedEvalOptions,
    evaluate_masked,
    parse_steps,
)
from lmkit.core.masking.nelbo import (  # noqa: F401
    RowEstimates,
    check_design,
    draw_plan,
    monte_carlo_nelbo,
    nelbo_rows,
    replicate_mean_var,
)
from lmkit.core.masking.process import (  # noqa: F401
    CHAIN_ORDERS,
    ESTIMATORS,
    LogLinearSchedule,
    MaskedSpec,
    document_segments,
    free_information,
    mask_tokens,
    masked_nats,
    masked_spec,
    padding_share,
    stratified_times,
    training_rows,
)
from lmkit.core.masking.rows import (  # noqa: F401
    EvalRows,
    RowBatch,
    common_detail,
    eval_rows,
    row_batches,
    row_bytes,
)
