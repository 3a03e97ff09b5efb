"""lmkit-uniform: the lmkit contract, and the bound checked against exact enumeration."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from lmkit.testing import contract_tests

from lmkit_uniform.diffusion import (
    alpha,
    posterior_log_probs,
    reverse_log_probs,
    step_kl,
    stratified_steps,
)

# Every lmkit contract check (loss, ids and shapes, metric kinds, bytes through core,
# determinism, checkpoint round trip, eval JSON) on the objective and its sampler.
test_contract = contract_tests(objectives=["uniform"], samplers=["uniform_ancestral"])

V = 3  # tiny vocabulary: every chain can be enumerated


def explicit_matrix(keep: float) -> torch.Tensor:
    """Q[i, j] = q(next = j | prev = i) for "keep with prob `keep`, else uniform"."""
    return keep * torch.eye(V, dtype=torch.float64) + (1 - keep) / V


def model_table(steps: int) -> torch.Tensor:
    """A fixed 'model': log p̃(x0 | x_t, step i) for every x_t and i, shape [T+1, V, V]."""
    gen = torch.Generator().manual_seed(0)
    return torch.log_softmax(2 * torch.randn(steps + 1, V, V, generator=gen, dtype=torch.float64),
                             dim=-1)


def f64(x: float) -> torch.Tensor:
    return torch.tensor([x], dtype=torch.float64)


def reverse_step(table: torch.Tensor, i: int, steps: int, xt: int) -> torch.Tensor:
    """p_θ(x_s | x_t = xt) over V at step i, through the plugin's closed form."""
    logp = reverse_log_probs(table[i, xt].view(1, 1, V), torch.tensor([[xt]]),
                             f64((i - 1) / steps), f64(i / steps))
    return logp.exp().view(V)


def test_closed_forms_match_the_transition_matrices():
    """posterior = Bayes on explicit matrices; reverse step = D3PM's
    p(x_s) ∝ Σ_x0 q(x_t | x_s) q(x_s | x0) p̃(x0) (the joint, normalised over x_s)."""
    s, t = 0.3, 0.55
    q_ts = explicit_matrix((1 - t) / (1 - s))  # q(x_t | x_s)
    q_s0 = explicit_matrix(1 - s)  # q(x_s | x0)
    guess = torch.softmax(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), dim=0)
    st = (f64(s), f64(t))
    for x0, xt in itertools.product(range(V), range(V)):
        post = q_ts[:, xt] * q_s0[x0, :]
        post = post / post.sum()
        ours = posterior_log_probs(torch.tensor([[x0]]), torch.tensor([[xt]]), *st,
                                   torch.zeros(1, 1, V, dtype=torch.float64)).exp().view(V)
        torch.testing.assert_close(ours, post)
    for xt in range(V):
        joint = q_ts[:, xt] * (guess @ q_s0)
        ours = reverse_log_probs(guess.log().view(1, 1, V), torch.tensor([[xt]]), *st)
        torch.testing.assert_close(ours.exp().view(V), joint / joint.sum())


def test_the_nelbo_bounds_the_exact_code_length_of_the_chain():
    """Enumerate everything for V=3, T=3: the reverse chain is a normalised model of x0; the
    sum of step KLs equals E_q[log q(x_1:T | x0) − log p(x_0:T)] and bounds −log p(x0)."""
    steps = 3
    table = model_table(steps)
    # exact marginal p(x0) of the generative chain x_1 ~ uniform, then steps i = T..1
    p_x = torch.full((V,), 1 / V, dtype=torch.float64)
    for i in range(steps, 0, -1):
        p_x = sum(p_x[xt] * reverse_step(table, i, steps, xt) for xt in range(V))
    assert float(p_x.sum()) == pytest.approx(1.0, abs=1e-12)

    for x0 in range(V):
        # the plugin's bound: Σ_i E_{x_t ~ q(x_t | x0)} KL_i, computed exactly over x_t
        nelbo = 0.0
        for i in range(1, steps + 1):
            q_t = explicit_matrix(1 - i / steps)[x0]
            for xt in range(V):
                kl = step_kl(table[i, xt].view(1, 1, V), torch.tensor([[x0]]),
                             torch.tensor([[xt]]), f64((i - 1) / steps), f64(i / steps))
                nelbo += float(q_t[xt] * kl)
        # the same bound from whole forward trajectories x_1/T, ..., x_1
        direct = 0.0
        for path in itertools.product(range(V), repeat=steps):  # path[i-1] = x_{i/T}
            log_q, log_p, prev = 0.0, math.log(1 / V), x0
            for i, x in enumerate(path, start=1):
                keep = alpha(f64(i / steps)) / alpha(f64((i - 1) / steps))
                log_q += math.log(explicit_matrix(keep.item())[prev, x])
                prev = x
            chain = [x0, *path]
            for i in range(1, steps + 1):
                log_p += math.log(reverse_step(table, i, steps, chain[i])[chain[i - 1]])
            direct += math.exp(log_q) * (log_q - log_p)
        assert nelbo == pytest.approx(direct, abs=1e-9)
        assert nelbo >= -math.log(p_x[x0]) - 1e-12
    assert nelbo > -math.log(p_x[x0]) + 1e-6  # a bound, not an identity, for this model


def test_step_kl_at_s0_is_the_reconstruction_nll():
    logp = torch.log_softmax(torch.randn(2, 4, 7, dtype=torch.float64), dim=-1)
    x0, xt = torch.randint(7, (2, 4)), torch.randint(7, (2, 4))
    s, t = torch.zeros(2, dtype=torch.float64), torch.full((2,), 0.01, dtype=torch.float64)
    kl = step_kl(logp, x0, xt, s, t)
    nll = -reverse_log_probs(logp, xt, s, t).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(kl, nll)


def test_stratified_steps_cover_the_chain():
    steps = stratified_steps(8, 8, torch.Generator().manual_seed(1))
    assert sorted(steps.tolist()) == list(range(1, 9))
    many = stratified_steps(1000, 7, torch.Generator().manual_seed(2))
    assert many.min() == 1 and many.max() == 7


def test_train_eval_through_the_cli(lmkit_data, tmp_path, capsys):
    from lmkit.cli import main

    run = tmp_path / "run"
    fast = ["--set", "train.seq_len=32", "--set", "model.seq_len=32", "--set",
            "train.batch_tokens=256", "--set", "train.val_tokens=512", "--set", "train.dtype=fp32",
            "--set", "options.steps=100"]
    main(["train", "--objective", "uniform", "--preset", "tiny", "--steps", "4", "--data",
          str(lmkit_data), "--out", str(run), "--quiet", "--device", "cpu", *fast])
    capsys.readouterr()
    main(["eval", str(run), "--json", "--max-tokens", "300", "--device", "cpu",
          "--opt", "steps=10,100", "--opt", "samples=3"])
    result = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in result["metrics"]] == ["nelbo_T10", "nelbo_T100"]
    for m in result["metrics"]:
        assert m["kind"] == "upper_bound" and m["unit"] == "bpb" and m["stderr"] > 0
        assert m["tokens"] == 288 and m["detail"]["samples_per_sequence"] == 3
        assert math.isfinite(m["value"]) and 0 < m["stderr"] < m["value"]
