"""The EMA of the weights (train.ema): its arithmetic, exact resume, and that validation, eval and
pack score the average."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmkit.core import runs
from lmkit.core.checkpoint import load_model_weights
from lmkit.core.config import resolve_config
from lmkit.core.data import open_data
from lmkit.core.ema import WeightEMA, ema_decay
from lmkit.core.evaluate import evaluate_loaded, evaluate_run
from lmkit.core.pack import pack_run
from lmkit.core.plan import plan_training
from lmkit.core.train import train
from lmkit.errors import LmkitError

FAST = ["train.seq_len=32", "train.batch_tokens=256", "train.log_every=2",
        "train.val_tokens=512", "train.dtype=fp32", "train.ckpt_seconds=0"]
DECAY = 0.8


def cfg_of(tiny_data, steps, extra=()):
    return resolve_config(preset="tiny", flags={"train.steps": steps, "data.path": str(tiny_data)},
                          sets=[*FAST, f"train.ema={DECAY}", *extra])


def ckpt(run_dir, name):
    return load_file(str(run_dir / "checkpoint" / name))


@pytest.fixture(scope="module")
def ema_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    train(cfg_of(tiny_data, 8), open_data(tiny_data), run_dir)
    return run_dir


def test_the_average_follows_the_recursion_in_float64():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)  # low-precision weights, fp32 average
    ema = WeightEMA(model, 0.9)
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    expect = {n: p.detach().double() for n, p in model.named_parameters()}
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(n)
        d = ema_decay(0.9, n)
        for name, p in model.named_parameters():
            expect[name] = d * expect[name] + (1 - d) * p.detach().double()
    assert ema_decay(0.9, 0) == pytest.approx(0.1) and ema_decay(0.9, 1000) == 0.9
    for name, value in ema.state_dict().items():
        torch.testing.assert_close(value.double(), expect[name], rtol=1e-5, atol=1e-5)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_in():
        for name, p in model.named_parameters():
            assert torch.equal(p.float(), ema.state_dict()[name].to(torch.bfloat16).float())
    for name, p in model.named_parameters():
        assert torch.equal(p, raw[name])  # restored bit for bit


def test_resumed_average_equals_the_uninterrupted_one(tiny_data, ema_run, tmp_path):
    split = tmp_path / "split"
    data = open_data(tiny_data)
    train(cfg_of(tiny_data, 3), data, split)
    plan = plan_training(config_file=None, preset=None, flags={"train.steps": 8}, sets=(),
                         out=split, resume="auto")
    assert plan.resume
    train(plan.cfg, data, plan.run_dir, resume=True)
    a, b = ckpt(ema_run, "ema.safetensors"), ckpt(split, "ema.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert a[key].dtype == torch.float32
        assert torch.equal(a[key], b[key]), key
    raw = ckpt(ema_run, "model.safetensors")
    assert any(not torch.equal(a[k], raw[k].float()) for k in a)  # an average, not a copy


def test_validation_eval_and_pack_score_the_average(ema_run):
    val = [r for r in runs.read_metrics(ema_run) if r["type"] == "val"][-1]
    assert val["weights"] == "ema"
    result = evaluate_run(ema_run, max_tokens=512)
    assert result["checkpoint"]["weights"] == "ema"
    assert result["metrics"][0]["value"] == pytest.approx(val["metrics"][0]["value"], abs=1e-9)
    # independently: the raw weights score otherwise; the saved average, loaded by hand, the same
    run = runs.load_run(ema_run)
    load_model_weights(ema_run, run.model)
    raw = evaluate_loaded(run, max_tokens=512)["metrics"][0]["value"]
    assert raw != pytest.approx(result["metrics"][0]["value"], abs=1e-6)
    missing, unexpected = run.model.load_state_dict(ckpt(ema_run, "ema.safetensors"),
                                                    strict=False)
    assert not unexpected
    by_hand = evaluate_loaded(run, max_tokens=512)["metrics"][0]["value"]
    assert by_hand == pytest.approx(result["metrics"][0]["value"], abs=1e-9)
    packed = pack_run(ema_run, bits=8, method="rtn", cap_bytes=None, max_tokens=512)
    assert packed["checkpoint"]["weights"] == "ema"
    assert packed["metrics_before"][0]["value"] == pytest.approx(by_hand, abs=1e-9)
    assert packed["metrics"][0]["value"] == pytest.approx(by_hand, abs=0.05)  # int8 round trip
    assert json.loads((ema_run / "pack.json").read_text())["checkpoint"]["weights"] == "ema"


def test_a_checkpoint_without_its_average_is_an_error(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    train(cfg_of(tiny_data, 2), open_data(tiny_data), run_dir)
    (run_dir / "checkpoint" / "ema.safetensors").unlink()
    with pytest.raises(LmkitError, match="ema.safetensors"):
        runs.load_run(run_dir)
    plain = tmp_path / "plain"
    train(cfg_of(tiny_data, 2, ["train.ema=0"]), open_data(tiny_data), plain)
    assert not (plain / "checkpoint" / "ema.safetensors").exists()
    assert runs.load_run(plain).weights == "raw"


def test_an_export_holds_the_average(ema_run, tmp_path):
    from lmkit.core import export

    out = tmp_path / "exported"
    made = export.export_model(ema_run, out, device="cpu", max_tokens=512)
    assert made["evaluation"]["checkpoint"]["weights"] == "ema"
    weights, average = load_file(str(out / "model.safetensors")), ckpt(ema_run, "ema.safetensors")
    for name, value in average.items():
        assert torch.equal(weights[name].float(), value), name
    loaded = runs.load_run(out)
    assert loaded.weights == "ema"
    assert evaluate_loaded(loaded, max_tokens=512)["metrics"][0]["value"] == pytest.approx(
        made["evaluation"]["metrics"][0]["value"], abs=1e-9)
