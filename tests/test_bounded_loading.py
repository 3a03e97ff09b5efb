"""Issue 14, defects 4-6: bounded loading (configs checked against the tensors present before
anything is allocated), strict JSON everywhere, and damaged run files as one clear error."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmkit.core import artifact as art_mod
from lmkit.core import build as build_mod
from lmkit.core import jsonfile
from lmkit.core.artifact import (
    MANIFEST_LEN,
    decode_artifact,
    encode_artifact,
    load_artifact,
    serialize,
)
from lmkit.core.bpb import Metric
from lmkit.core.config import resolve_config
from lmkit.core.data import open_data
from lmkit.core.kinds import format_metric
from lmkit.core.quant import quantize_model
from lmkit.core.runs import load_run, read_metrics
from lmkit.core.train import train
from lmkit.core.trunk import ModelConfig, Transformer
from lmkit.errors import LmkitError

FAST = ["train.seq_len=32", "train.batch_tokens=256", "train.log_every=1",
        "train.val_tokens=256", "train.dtype=fp32"]


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory) -> Path:
    cfg = resolve_config(preset="tiny", flags={"train.steps": 2, "data.path": str(tiny_data)},
                         sets=FAST)
    out = tmp_path_factory.mktemp("bounded") / "run"
    train(cfg, open_data(tiny_data), out)
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def small_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, n_kv_head=1, cond_dim=8)
    return Transformer(cfg, 64)


def artifact_bytes(model: Transformer, edit=None, tensors=None) -> bytes:
    from dataclasses import asdict

    tensors = tensors or quantize_model(model, bits=8, method="rtn")
    meta = {"model": {"config": asdict(model.cfg), "vocab_size": model.vocab_size,
                      "n_special": model.n_special}}
    if edit:
        edit(meta)
    return encode_artifact(serialize(tensors, meta), "zlib")


def no_model_built(monkeypatch) -> list:
    calls: list = []
    real = build_mod.new_model
    monkeypatch.setattr(build_mod, "new_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


# -- defect 4: memory bombs ----------------------------------------------------------------
def test_memory_bomb_artifact_manifest_declaring_a_huge_model_is_refused_unbuilt(tmp_path,
                                                                                 monkeypatch):
    """A small artifact with a valid checksum whose manifest declares d_model=4096, n_layer=48:
    refused by comparing the config with the tensors present, before any model is built."""
    def huge(meta):
        meta["model"]["config"].update(d_model=4096, n_layer=48, n_head=32, n_kv_head=8)

    path = tmp_path / "bomb.int8"
    path.write_bytes(artifact_bytes(small_model(), huge))
    calls = no_model_built(monkeypatch)
    with pytest.raises(LmkitError, match="does not match the model its config describes"):
        load_artifact(path)
    assert calls == []


def test_memory_bomb_artifact_config_beyond_the_sane_limits_is_refused(tmp_path):
    path = tmp_path / "bomb.int8"
    path.write_bytes(artifact_bytes(small_model(),
                                    lambda m: m["model"]["config"].update(n_layer=10**6)))
    with pytest.raises(LmkitError, match="model.n_layer"):
        load_artifact(path)


def test_memory_bomb_payload_is_capped_by_the_declared_tensors(tmp_path):
    """A header claiming more payload than the manifest's arrays need is refused before the
    payload is decompressed (no 64x-file-size allowance)."""
    model = small_model()
    raw = art_mod.decode_artifact(artifact_bytes(model), "x")
    padded = raw + bytes(8 << 20)  # 8 MiB of zeros nobody declared
    path = tmp_path / "padded.int8"
    path.write_bytes(encode_artifact(padded, "zlib"))
    assert len(padded) < art_mod.payload_limit(path.stat().st_size)
    with pytest.raises(LmkitError, match="need only"):
        load_artifact(path)
    assert art_mod.declared_payload(path.read_bytes()) == len(raw)


def test_memory_bomb_non_finite_fp16_tensors_do_not_load(tmp_path):
    model = small_model()
    tensors = quantize_model(model, bits=8, method="rtn")
    fp16 = next(qt for qt in tensors if qt.scheme == "fp16")
    fp16.data.view(-1)[0] = float("nan")
    path = tmp_path / "nan.int8"
    path.write_bytes(artifact_bytes(model, tensors=tensors))
    with pytest.raises(LmkitError, match="non-finite"):
        load_artifact(path)


def test_memory_bomb_run_json_declaring_a_huge_model_is_refused_unbuilt(run_copy, monkeypatch):
    meta = json.loads((run_copy / "run.json").read_text())
    meta["model"]["config"].update(d_model=4096, n_layer=48, n_head=32, n_kv_head=8)
    (run_copy / "run.json").write_text(json.dumps(meta))
    calls = no_model_built(monkeypatch)
    with pytest.raises(LmkitError, match="model.safetensors.*does not match"):
        load_run(run_copy)
    assert calls == []


def test_memory_bomb_safetensors_shapes_are_checked_before_allocation(run_copy):
    path = run_copy / "checkpoint" / "model.safetensors"
    weights = load_file(str(path))
    name = next(iter(weights))
    weights[name] = torch.zeros(3, 3)
    save_file(weights, str(path))
    with pytest.raises(LmkitError, match=f"tensor {name} has shape"):
        load_run(run_copy)


def test_nan_weights_in_a_checkpoint_do_not_load(run_copy):
    path = run_copy / "checkpoint" / "model.safetensors"
    weights = load_file(str(path))
    weights["embed.weight"][0, 0] = float("nan")
    save_file(weights, str(path))
    with pytest.raises(LmkitError, match="NaN or infinite"):
        load_run(run_copy)


# -- defect 5: NaN output ------------------------------------------------------------------
def test_nan_metric_is_never_labelled_exact():
    m = Metric("nll", "exact", float("nan"), "bpb", None, 10, 20)
    assert m.kind == "score" and m.detail["claimed_kind"] == "exact"
    cell = format_metric(m.to_dict(), unit=True)
    assert cell.startswith("nan (not finite)") and "=" not in cell
    back = Metric.from_dict(json.loads(jsonfile.dumps(m.to_dict())))
    assert math.isnan(back.value) and back.kind == "score"


def test_nan_json_output_is_strict():
    text = jsonfile.dumps({"metrics": [{"value": float("nan"), "stderr": float("inf")}],
                           "x": [float("-inf")], "n": 1.5})
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    m = data["metrics"][0]
    assert m["value"] is None and "nan" in m["value_reason"]
    assert m["stderr"] is None and "inf" in m["stderr_reason"]
    assert data["x"] == [None] and data["n"] == 1.5


def test_nan_every_json_writer_is_strict(run_dir):
    """No JSON writer outside jsonfile (and the other engineer's checkpoint/train/atomic files)
    calls json.dump(s) directly."""
    root = Path(__file__).resolve().parents[1] / "lmkit"
    allowed = {"core/jsonfile.py", "core/artifact.py", "testing.py",
               "core/bench/fuzz.py"}  # fuzz writes damaged inputs on purpose
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "json.dump" in p.read_text() and str(p.relative_to(root)) not in allowed]
    assert offenders == []


def test_nan_pack_of_a_diverged_run_is_refused(run_copy):
    from lmkit.core.pack import pack_run

    path = run_copy / "checkpoint" / "model.safetensors"
    weights = load_file(str(path))
    for v in weights.values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    save_file(weights, str(path))
    with pytest.raises(LmkitError, match="NaN or infinite"):
        pack_run(run_copy, device="cpu", bits=8, max_tokens=256)
    assert not list(run_copy.glob("artifact.*"))


# -- defect 6: damaged run files -----------------------------------------------------------
DAMAGE = {
    "non_utf8": b"\xff\xfe{\"a\": 1}",
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "deep_but_parsable": b"[" * 500 + b"]" * 500,
    "list": b"[1, 2, 3]",
    "string": b"\"run\"",
    "empty_object": b"{}",
    "truncated": b"{\"objective\": \"ar\", \"con",
    "lone_surrogate": b"{\"objective\": \"\\ud800\"}",
    "huge_int": b"{\"step\": " + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("name", ["run.json", "checkpoint/state.json"])
def test_damaged_run_files_are_one_clear_error(run_copy, name, damage):
    (run_copy / name).write_bytes(DAMAGE[damage])
    with pytest.raises(LmkitError) as info:
        load_run(run_copy)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("tokens"),
    lambda m: m["tokens"].update(vocab_size="1024"),
    lambda m: m["tokens"].update(special={"mask": -5}),
    lambda m: m.update(model=[]),
    lambda m: m["model"].pop("config"),
    lambda m: m["config"].update(train=7),
    lambda m: m["config"]["train"].update(seq_len=-1),
    lambda m: m["model"]["config"].update(n_head="x"),
    lambda m: m.pop("data"),
])
def test_run_json_with_missing_or_mistyped_keys_is_one_clear_error(run_copy, edit):
    meta = json.loads((run_copy / "run.json").read_text())
    edit(meta)
    (run_copy / "run.json").write_text(json.dumps(meta))
    with pytest.raises(LmkitError):
        load_run(run_copy)


@pytest.mark.parametrize("edit", [
    lambda s: s.pop("step"), lambda s: s.update(tokens=-1), lambda s: s.update(seconds="x"),
    lambda s: s.update(format=["x"]),
])
def test_state_json_with_missing_or_mistyped_keys_is_one_clear_error(run_copy, edit):
    path = run_copy / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    with pytest.raises(LmkitError):
        load_run(run_copy)


@pytest.mark.parametrize("damage", ["non_utf8", "deep", "list", "truncated", "lone_surrogate"])
def test_damaged_metrics_jsonl_is_one_clear_error(run_copy, damage):
    """Damage inside the log is one error naming the line; as the last line it is a torn tail
    (a crash or a full disk), dropped with a warning (tests/test_crash_safety.py)."""
    log = run_copy / "metrics.jsonl"
    log.write_bytes(b'{"step": 1}\n' + DAMAGE[damage] + b'\n{"step": 2}\n')
    with pytest.raises(LmkitError, match="metrics.jsonl line 2"):
        read_metrics(run_copy)
    log.write_bytes(b'{"step": 1}\n' + DAMAGE[damage] + b"\n")
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_metrics(run_copy) == [{"step": 1}]


@pytest.mark.parametrize("damage", ["non_utf8", "deep", "list", "truncated"])
def test_damaged_data_manifest_is_one_clear_error(tiny_data, tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "manifest.json").write_bytes(DAMAGE[damage])
    with pytest.raises(LmkitError, match="manifest.json"):
        open_data(data)


def test_damaged_artifact_manifest_deep_nesting_is_one_clear_error(tmp_path):
    manifest = b"[" * 500 + b"]" * 500
    path = tmp_path / "deep.bin"
    path.write_bytes(encode_artifact(MANIFEST_LEN.pack(len(manifest)) + manifest, "zlib"))
    with pytest.raises(LmkitError, match="corrupt"):
        load_artifact(path)
    assert decode_artifact(path.read_bytes(), path)
