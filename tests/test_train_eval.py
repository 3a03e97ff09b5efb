"""Training, resume and evaluation end to end on the tiny prepared corpus."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

from lmkit.core import runs
from lmkit.core.bpb import ByteLUT
from lmkit.core.config import resolve_config
from lmkit.core.data import load_val_tokens, open_data
from lmkit.core.evaluate import evaluate_run
from lmkit.core.plan import plan_training
from lmkit.core.train import lr_multiplier, train
from lmkit.errors import LmkitError

FAST = ["train.seq_len=32", "train.batch_tokens=256", "train.log_every=2",
        "train.val_tokens=512", "train.dtype=fp32"]


def tiny_cfg(tiny_data, steps=6, extra=()):
    return resolve_config(preset="tiny", flags={"train.steps": steps, "data.path": str(tiny_data)},
                          sets=[*FAST, *extra])


def weights(run_dir):
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def test_lr_schedule_shape():
    assert lr_multiplier(0, 0.0, warmup_steps=4, warmdown_frac=0.5) == pytest.approx(0.25)
    assert lr_multiplier(10, 0.3, warmup_steps=4, warmdown_frac=0.5) == 1.0
    assert lr_multiplier(10, 0.75, warmup_steps=4, warmdown_frac=0.5) == pytest.approx(0.5)
    assert lr_multiplier(10, 1.0, warmup_steps=4, warmdown_frac=0.5) == 0.0


def test_run_directory_is_self_describing(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(tiny_cfg(tiny_data), open_data(tiny_data), run_dir)
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 256
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["objective"] == "ar"
    assert meta["model"]["params"] == sum(t.numel() for t in weights(run_dir).values())
    assert meta["environment"]["torch"] == torch.__version__
    assert any(p["name"] == "lmkit.plugins.ar" for p in meta["environment"]["plugins"])
    assert len(meta["data"]["tokenizer"]["sha256"]) == 64
    records = runs.read_metrics(run_dir)
    train_steps = [r["step"] for r in records if r["type"] == "train"]
    assert train_steps == [1, 2, 4, 6]
    assert all(r["loss"] > 0 and r["tok_s"] > 0 for r in records if r["type"] == "train")
    val = [r for r in records if r["type"] == "val"]
    assert val[-1]["metrics"][0]["kind"] == "exact" and val[-1]["metrics"][0]["unit"] == "bpb"
    # the saved config re-runs: resolving it gives back the same config
    again = resolve_config(config_file=run_dir / "config.toml")
    assert again.model == tiny_cfg(tiny_data).model


def test_logged_throughput_counts_every_training_second_once(tiny_data, tmp_path):
    """Each train record's tok/s divides its window's tokens by that window's training seconds,
    also when a validation falls inside the window: the windows' seconds add up to the run's."""
    run_dir = tmp_path / "run"
    summary = train(tiny_cfg(tiny_data, steps=8, extra=["train.log_every=4",
                                                        "train.val_every=3"]),
                    open_data(tiny_data), run_dir)
    records = [r for r in runs.read_metrics(run_dir) if r["type"] == "train"]
    assert [r["step"] for r in records] == [1, 4, 8]
    steps = [0] + [r["step"] for r in records]
    window_seconds = sum((b - a) * 256 / r["tok_s"]
                         for a, b, r in zip(steps, steps[1:], records, strict=False))
    assert window_seconds == pytest.approx(summary["train_seconds"], rel=1e-6)


def test_resume_equals_uninterrupted(tiny_data, tmp_path):
    data = open_data(tiny_data)
    straight = tmp_path / "straight"
    train(tiny_cfg(tiny_data, steps=6), data, straight)

    split = tmp_path / "split"
    train(tiny_cfg(tiny_data, steps=3), data, split)
    plan = plan_training(config_file=None, preset=None, flags={"train.steps": 6}, sets=(),
                         out=split, resume="auto")
    assert plan.resume
    train(plan.cfg, data, plan.run_dir, resume=True)

    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # the log of the resumed run matches the uninterrupted one step for step
    loss = lambda d: [r["loss"] for r in runs.read_metrics(d) if r["type"] == "train"]  # noqa: E731
    assert loss(straight)[-1] == loss(split)[-1]


def test_resume_refuses_a_different_model(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_cfg(tiny_data, steps=2), open_data(tiny_data), run_dir)
    with pytest.raises(LmkitError, match="model.n_layer"):
        plan_training(config_file=None, preset=None, flags={}, sets=["model.n_layer=3"],
                      out=run_dir, resume="auto")
    with pytest.raises(LmkitError, match="not empty"):
        train(tiny_cfg(tiny_data, steps=2), open_data(tiny_data), run_dir)


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ar") / "run"
    train(tiny_cfg(tiny_data, steps=8), open_data(tiny_data), run_dir)
    return run_dir


def lut_bytes(tiny_data, targets, prev):
    lut = ByteLUT.from_sentencepiece(tiny_data / "tokenizer.model")
    return int(lut.target_bytes(targets, prev).sum())


def test_eval_json_contract_and_exact_bytes(tiny_data, trained_run):
    result = evaluate_run(trained_run, max_tokens=1000, options={"stride": 8}, device="cpu")
    assert json.loads((trained_run / "eval.json").read_text()) == json.loads(json.dumps(result))
    by_name = {m["name"]: m for m in result["metrics"]}
    assert set(by_name) == {"nll", "nll_sliding"}
    for m in result["metrics"]:
        assert {"name", "kind", "value", "unit", "stderr", "tokens", "bytes", "detail"} <= set(m)
        assert m["kind"] == "exact" and m["stderr"] is None and m["unit"] == "bpb"
        assert 0 < m["value"] < 20

    val = load_val_tokens(open_data(tiny_data), 1000)
    # non-overlapping windows of 32 score targets 1..992; the 8-token tail is not scored
    nll = by_name["nll"]
    assert nll["tokens"] == 992 and nll["detail"]["unscored_tail_tokens"] == 8
    assert nll["bytes"] == lut_bytes(tiny_data, val[1:993], val[0:992])
    # sliding windows score every one of the 1000 targets exactly once
    sliding = by_name["nll_sliding"]
    assert sliding["tokens"] == 1000
    assert sliding["bytes"] == lut_bytes(tiny_data, val[1:], val[:-1])


def test_lut_bytes_match_decoded_text_of_the_scored_stream(tiny_data, trained_run):
    """The scored stream's LUT bytes equal the UTF-8 length of its decoded documents."""
    result = evaluate_run(trained_run, options={"stride": 16}, device="cpu")
    sliding = next(m for m in result["metrics"] if m["name"] == "nll_sliding")
    val = load_val_tokens(open_data(tiny_data)).tolist()
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data / "tokenizer.model"))
    docs, current = [], []
    for tok in val:
        if tok == sp.bos_id():
            if current:
                docs.append(current)
            current = []
        else:
            current.append(tok)
    docs.append(current)
    decoded = sum(len(sp.decode(d).encode("utf-8")) for d in docs)
    assert sliding["tokens"] == len(val) - 1
    assert sliding["bytes"] == decoded


def test_eval_is_reproducible_and_protocols_agree(trained_run):
    a = evaluate_run(trained_run, max_tokens=2048, options={"stride": 32}, device="cpu")
    b = evaluate_run(trained_run, max_tokens=2048, options={"stride": 32}, device="cpu")
    assert a["metrics"] == b["metrics"]
    # with stride == seq_len, sliding windows are the non-overlapping windows: two code paths agree
    nll, sliding = a["metrics"]
    assert sliding["tokens"] == nll["tokens"] == 2048
    assert sliding["bytes"] == nll["bytes"]
    assert sliding["value"] == pytest.approx(nll["value"], rel=1e-6)


def test_training_learns(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(tiny_cfg(tiny_data, steps=30, extra=["optim.lr=0.01"]), open_data(tiny_data),
                    run_dir)
    losses = [r["loss"] for r in runs.read_metrics(run_dir) if r["type"] == "train"]
    assert losses[-1] < losses[0] - 1.0
    # a uniform guess over 1024 ids is 10 bits/token ≈ 3.3 bpb here; training must beat it
    assert summary["val"][0]["value"] < 3.0
