"""Objectives own trainable modules: trained, counted, checkpointed, resumed, packed, restored.

The built-in multi-token-prediction objective (``mtp``) keeps a t+2 head of its own; an
objective that holds a module it did not declare is refused, naming the attribute.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmkit.builtin.ar import ARObjective
from lmkit.core import runs
from lmkit.core.build import build
from lmkit.core.config import resolve_config
from lmkit.core.data import open_data
from lmkit.core.evaluate import evaluate_artifact, evaluate_loaded
from lmkit.core.pack import pack_run
from lmkit.core.plan import plan_training
from lmkit.core.train import train
from lmkit.errors import LmkitError
from tests.conftest import registered_plugin

FAST = ["train.seq_len=32", "train.batch_tokens=256", "train.log_every=2",
        "train.val_tokens=512", "train.dtype=fp32"]
HEAD = "objective_modules.head2.weight"


def cfg_for(tiny_data, objective="mtp", steps=6):
    return resolve_config(preset="tiny", sets=FAST, flags={
        "objective": objective, "train.steps": steps, "data.path": str(tiny_data)})


def weights(run_dir):
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


@pytest.fixture(scope="module")
def mtp_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mtp") / "run"
    summary = train(cfg_for(tiny_data), open_data(tiny_data), run_dir)
    return run_dir, summary


def test_the_head_is_built_trained_and_counted(tiny_data, mtp_run):
    run_dir, summary = mtp_run
    fresh = build(cfg_for(tiny_data), open_data(tiny_data))
    before = fresh.model.objective_modules["head2"].weight.detach().clone()
    after = weights(run_dir)[HEAD]
    assert after.shape == (fresh.tokens.vocab_size, 64) and not torch.equal(before, after)
    ar = build(cfg_for(tiny_data, "ar"), open_data(tiny_data))
    n_ar = sum(p.numel() for p in ar.model.parameters())
    assert summary["params"] == n_ar + after.numel()
    assert runs.load_run(run_dir).meta["model"]["params"] == summary["params"]
    # the loss metrics are logged (metrics.jsonl and the progress line's record)
    records = [r for r in runs.read_metrics(run_dir) if r["type"] == "train"]
    assert all(set(r["loss_metrics"]) == {"nll_next", "nll_t2"} for r in records)


def test_resume_is_bit_exact_with_the_head(tiny_data, mtp_run, tmp_path):
    run_dir, _ = mtp_run
    split = tmp_path / "split"
    train(cfg_for(tiny_data, steps=3), open_data(tiny_data), split)
    plan = plan_training(config_file=None, preset=None, flags={"train.steps": 6}, sets=(),
                         out=split, resume="auto")
    train(plan.cfg, open_data(tiny_data), plan.run_dir, resume=True)
    a, b = weights(run_dir), weights(split)
    assert HEAD in a and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_pack_and_eval_artifact_restore_the_head(mtp_run):
    run_dir, _ = mtp_run
    from lmkit.core.artifact import read_artifact

    result = pack_run(run_dir, bits=8, max_tokens=512, device="cpu")
    _, stored_tensors = read_artifact(result["artifact"])
    assert HEAD in {qt.name for qt in stored_tensors}
    again = evaluate_artifact(result["artifact"], max_tokens=512, device="cpu")
    assert again["metrics"] == result["metrics"]
    # the round trip really holds the quantized head (not a freshly initialised one)
    from lmkit.core.evaluate import load_target

    run, model, _ = load_target(result["artifact"], "cpu")
    stored, packed = run.model.objective_modules["head2"].weight, \
        model.objective_modules["head2"].weight
    assert not torch.equal(stored, packed)  # int8 rounding changed it ...
    assert torch.allclose(stored, packed, atol=float(stored.detach().abs().max()) / 100)


def test_exact_bpb_comes_from_the_next_token_head_only(mtp_run):
    run_dir, _ = mtp_run
    run = runs.load_run(run_dir)
    base = evaluate_loaded(run, max_tokens=512)["metrics"][0]
    with torch.no_grad():
        run.model.objective_modules["head2"].weight.mul_(3.0)
    assert evaluate_loaded(run, max_tokens=512)["metrics"][0] == base


@dataclass
class _Nothing:
    pass


class Sneaky(ARObjective):
    """Keeps a head it never declares: it would silently never train, save or pack."""

    name = "sneaky"
    Options = _Nothing

    def __init__(self, options, tokens):
        super().__init__(options, tokens)
        self.extra_head = nn.Linear(4, 4)


@pytest.fixture
def sneaky():
    with registered_plugin("sneaky", objectives=[Sneaky]):
        yield


def test_an_undeclared_module_is_an_error_naming_it(tiny_data, sneaky):
    with pytest.raises(LmkitError, match="attribute 'extra_head' that it did not declare"):
        build(cfg_for(tiny_data, "sneaky"), open_data(tiny_data))
