"""Parameter-golf wall-clock runs: the time cap, its warmdown, priming and the separate clocks."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from lmkit.core import runs
from lmkit.core import train as train_mod
from lmkit.core.checkpoint import read_state
from lmkit.core.config import resolve_config
from lmkit.core.data import open_data
from lmkit.core.plan import Budget, Pace, budget_done, lr_multiplier, scheduled_end
from lmkit.core.prime import prime
from lmkit.core.train import train
from lmkit.errors import LmkitError

FAST = ["train.seq_len=32", "train.batch_tokens=256", "train.log_every=1",
        "train.val_tokens=512", "train.dtype=fp32", "train.ckpt_seconds=0"]
TIMING = {"seconds", "train_seconds", "val_seconds", "clock_seconds", "tok_s", "mfu", "eta_s"}


def cfg_of(tiny_data, flags, extra=()):
    return resolve_config(preset="tiny", flags={"data.path": str(tiny_data), **flags},
                          sets=[*FAST, *extra])


def test_pace_is_the_mean_of_the_recent_steps():
    pace = Pace(window=3)
    assert pace.estimate() == 0.0
    for seconds in (1.0, 2.0, 3.0, 10.0):
        pace.add(seconds)
    assert pace.estimate() == pytest.approx((2.0 + 3.0 + 10.0) / 3)


def test_a_step_ending_within_half_a_step_of_the_cap_is_scheduled_at_it():
    pace = Pace()
    for _ in range(4):
        pace.add(1.0)
    cap = Budget(0, 0, 10.0)
    assert scheduled_end(cap, 5.0, pace) == 6.0  # well before the cap: the predicted end
    assert scheduled_end(cap, 8.4, pace) == pytest.approx(9.4)  # the next one ends nearer
    assert scheduled_end(cap, 8.6, pace) == 10.0  # 0.4 before; the next would be 0.6 past
    assert scheduled_end(cap, 9.5, pace) == 10.5  # past the cap: its predicted end
    assert scheduled_end(Budget(100, 0, 0.0), 99.0, pace) == 100.0  # no time cap: no snapping


def test_budget_done_counts_the_scheduled_clock():
    budget = Budget(0, 0, 10.0)
    state = {"step": 5, "tokens": 50, "seconds": 9.9}
    assert not budget_done(budget, state)  # an old checkpoint (no clock): its seconds
    assert not budget_done(budget, {**state, "seconds": 10.5, "clock_seconds": 9.95})
    assert budget_done(budget, {**state, "clock_seconds": 10.02})
    assert not budget_done(Budget(0, 0, 20.0), {**state, "clock_seconds": 10.02})  # extended


def test_time_cap_stops_at_the_cap_with_lr_at_the_floor_and_validation_excluded(
        tiny_data, tmp_path, monkeypatch):
    """--time 3 with two priming steps and a first validation that sleeps 1 s: the training
    clock reaches the cap (validation does not shorten it), the run stops within a step of it,
    and the last step ran at the schedule's floor. Bounds are in steps, not seconds: this
    machine is shared, so a step takes what it takes."""
    slow, calls = 1.0, []
    real = train_mod.run_evaluation

    def slow_first_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(slow)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "run_evaluation", slow_first_evaluation)
    cap, warmdown = 3.0, 0.5
    cfg = cfg_of(tiny_data, {"train.time": cap},
                 ["train.val_every=1", "train.val_tokens=64", "train.prime_steps=2",
                  f"train.warmdown_frac={warmdown}"])
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    summary = train(cfg, open_data(tiny_data), run_dir)
    wall = time.perf_counter() - t0
    records = runs.read_metrics(run_dir)
    steps = [r for r in records if r["type"] == "train"]
    vals = [r for r in records if r["type"] == "val"]
    assert len(vals) >= 2 and len(calls) == len(vals)  # during training, and at the end
    assert [r["step"] for r in steps] == list(range(1, summary["steps"] + 1))
    # every step's LR is the schedule at the fraction of the cap it was scheduled to end at
    for r in steps:
        expect = lr_multiplier(r["step"] - 1, r["clock_seconds"] / cap, cfg.train.warmup_steps,
                               warmdown)
        assert r["lr_mult"] == pytest.approx(expect, abs=1e-12), r
    # the schedule's clock is the training clock plus a prediction of one step
    mean_step = summary["train_seconds"] / summary["steps"]
    assert all(abs(r["clock_seconds"] - r["seconds"]) < 3 * mean_step + 0.05 for r in steps)
    # the last step was scheduled at the cap, so it ran at the floor; none before it was
    assert steps[-1]["clock_seconds"] >= cap and steps[-1]["lr_mult"] == 0.0
    assert all(r["clock_seconds"] < cap and r["lr_mult"] > 0 for r in steps[:-1])
    # stopped at the cap: at most the step that crossed it and the floor step after it end past
    # it, and training did not stop short of it by more than about a step
    assert sum(r["seconds"] >= cap for r in steps) <= 2
    assert summary["train_seconds"] >= cap - 3 * mean_step
    assert summary["seconds"] == summary["train_seconds"]
    # validation has its own clock, and it did not come out of the training budget
    assert summary["val_seconds"] >= slow
    assert vals[-1]["val_seconds"] == pytest.approx(summary["val_seconds"], abs=1e-3)
    assert summary["prime_seconds"] > 0
    assert wall >= summary["train_seconds"] + summary["val_seconds"] + summary["prime_seconds"]
    assert all(r["train_seconds"] == r["seconds"] for r in steps)
    assert steps[-1]["val_seconds"] >= slow  # the slow validation came before the last step


def test_priming_trains_nothing(tiny_data, tmp_path):
    """Priming steps (compilation warm-up) are undone: weights, optimizer state, loader and RNG
    end bitwise where a run without them ends, and the log is the same."""
    data = open_data(tiny_data)
    plain, primed = tmp_path / "plain", tmp_path / "primed"
    train(cfg_of(tiny_data, {"train.steps": 4}), data, plain)
    summary = train(cfg_of(tiny_data, {"train.steps": 4}, ["train.prime_steps=2"]), data, primed)
    assert summary["prime_seconds"] > 0
    for name in ("model.safetensors", "optim.safetensors"):
        a, b = (load_file(str(d / "checkpoint" / name)) for d in (plain, primed))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    strip = lambda d: [{k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
                       for r in runs.read_metrics(d)]
    assert strip(plain) == strip(primed)


def test_prime_restores_weights_optimizer_loader_and_rng():
    class Loader:  # the RotatingLoader's state protocol
        position = 0

        def state_dict(self):
            return {"position": self.position}

        def load_state_dict(self, state):
            self.position = state["position"]

    torch.manual_seed(0)
    model, loader = torch.nn.Linear(3, 2), Loader()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = ({k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state())

    def step(i):
        loader.position += 10
        model(torch.randn(4, 3)).square().sum().backward()  # draws from the RNG
        opt.step()

    seconds = prime(3, step, model, [opt], loader)
    assert seconds > 0 and loader.position == 0 and not opt.state
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[0][key]), key
    assert torch.equal(torch.get_rng_state(), before[1])


def test_lr_multiplier_reaches_its_floor_at_the_cap():
    # the time schedule is lr_multiplier at the elapsed fraction: 0 from the cap on
    assert lr_multiplier(100, 1.0, 0, 0.2) == 0.0
    assert lr_multiplier(100, 1.3, 0, 0.2) == 0.0
    assert lr_multiplier(100, 0.9, 0, 0.2) == pytest.approx(0.5)


def test_bad_time_options_are_one_line_errors(tiny_data):
    for bad in ("train.prime_steps=-1", "train.ema=1.0", "train.ema=-0.5", "train.ema=nan"):
        with pytest.raises(LmkitError, match=bad.split("=")[0]):
            cfg_of(tiny_data, {"train.steps": 2}, [bad])


def test_damaged_clocks_in_a_checkpoint_are_one_line_errors(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    train(cfg_of(tiny_data, {"train.steps": 1}), open_data(tiny_data), run_dir)
    path = run_dir / "checkpoint" / "state.json"
    good = json.loads(path.read_text())
    assert good["val_seconds"] > 0 and good["clock_seconds"] >= 0
    for bad in ("x", -1.0, True, None):
        path.write_text(json.dumps({**good, "clock_seconds": bad}))
        with pytest.raises(LmkitError, match="clock_seconds"):
            read_state(run_dir)
