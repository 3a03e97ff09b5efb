"""`lmkit export`: a Hub-ready folder that loads through the one loading path to the same model.

The folder's figures are checked against `lmkit eval` of the run (and of a packed artifact),
metric for metric; the card's front matter is parsed with PyYAML (an independent parser); the
weights against the checkpoint's own file.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lmkit.core import atomic, export, jsonfile, runs
from lmkit.core.config import resolve_config
from lmkit.core.data import open_data
from lmkit.core.modelcard import CARD_METRIC_KEYS, to_yaml
from lmkit.core.train import train
from lmkit.errors import LmkitError
from tests.test_cli import FIXTURE_MODEL, assert_one_clear_error, run_cli

FAST = ["train.seq_len=32", "train.batch_tokens=256", "train.log_every=4",
        "train.val_tokens=256", "train.dtype=fp32"]
SCORE = ["--max-tokens", "512", "--device", "cpu"]
FILES = ["README.md", "config.json", "model.safetensors", "tokenizer.model"]


def tiny_run(tiny_data: Path, run_dir: Path, objective: str) -> Path:
    cfg = resolve_config(preset="tiny", flags={"train.steps": 2, "data.path": str(tiny_data),
                                               "objective": objective}, sets=FAST)
    train(cfg, open_data(tiny_data), run_dir)
    return run_dir


def cli_json(args: list[str], capsys) -> dict:
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    return json.loads(out)


def card_figures(metrics: list[dict]) -> list[dict]:
    return [{k: m[k] for k in CARD_METRIC_KEYS} for m in metrics]


def front_matter(folder: Path) -> dict:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, sep, body = text[4:].partition("\n---\n")
    assert sep and body.strip()
    return yaml.safe_load(head)


def check_export(run_dir: Path, out: Path, capsys) -> tuple[dict, dict]:
    """Evaluate the run, export it, evaluate the folder: the same figures everywhere."""
    ran = cli_json(["eval", str(run_dir), *SCORE, "--json"], capsys)
    made = cli_json(["export", str(run_dir), str(out), *SCORE, "--json"], capsys)
    assert made["files"] == FILES and sorted(p.name for p in out.iterdir()) == FILES
    # the card states the run's stored evaluation of this protocol (the one just made)
    assert made["evaluation"]["reused_from"] == ran["files"]["record"]
    got = cli_json(["eval", str(out), *SCORE, "--json"], capsys)
    assert got["metrics"] == ran["metrics"]  # every key, value, stderr, tokens, bytes, detail
    assert card_figures(got["metrics"]) == card_figures(ran["metrics"])
    assert got["export"]["path"] == str(out.resolve()) and "files" not in got
    assert not (out / "evals").exists() and not (out / "eval.json").exists()
    meta = front_matter(out)
    assert meta["lmkit"]["metrics"] == card_figures(ran["metrics"])
    assert meta["lmkit"]["protocol"]["max_tokens"] == 512
    assert meta["lmkit"]["protocol"]["checkpoint_step"] == ran["checkpoint"]["step"]
    index = meta["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in index] == [m["value"] for m in ran["metrics"]]
    assert meta["library_name"] == "lmkit" and ran["objective"] in meta["tags"]
    return ran, got


@pytest.fixture(scope="module")
def ar_run(tiny_data, tmp_path_factory) -> Path:
    return tiny_run(tiny_data, tmp_path_factory.mktemp("export") / "ar", "ar")


@pytest.fixture(scope="module")
def ar_export(ar_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "ar-tiny"
    export.export_model(ar_run, out, device="cpu", max_tokens=512)
    return out


def test_export_of_an_ar_run_evals_like_the_run(ar_run, tmp_path, capsys):
    out = tmp_path / "ar-tiny"
    check_export(ar_run, out, capsys)
    # the weights are the checkpoint's, tensor for tensor
    ours = load_file(str(out / "model.safetensors"))
    theirs = load_file(str(ar_run / "checkpoint" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (out / "tokenizer.model").read_bytes() == (ar_run / "tokenizer.model").read_bytes()
    config = json.loads((out / "config.json").read_text())
    run_meta = json.loads((ar_run / "run.json").read_text())
    assert config["model"] == run_meta["model"] and config["tokens"] == run_meta["tokens"]
    assert (config["objective"], config["seq_len"], config["vocab_size"]) == ("ar", 32, 1024)
    assert config["exported_from"]["run"] == str(ar_run.resolve())


def test_sample_of_an_export_is_the_runs_text(ar_run, ar_export, capsys):
    args = ["--num", "2", "--length", "12", "--seed", "3", "--device", "cpu", "--json"]
    from_export = cli_json(["sample", str(ar_export), *args], capsys)["samples"]
    from_run = cli_json(["sample", str(ar_run), *args], capsys)["samples"]
    assert [s["token_ids"] for s in from_export] == [s["token_ids"] for s in from_run]
    assert all(len(s["token_ids"]) == 12 and s["text"].strip() for s in from_export)


def test_with_val_the_folder_evaluates_from_its_own_copy(ar_run, tmp_path, capsys):
    out = tmp_path / "with-val"
    made = cli_json(["export", str(ar_run), str(out), *SCORE, "--with-val", "--json"], capsys)
    assert (out / "val.bin").read_bytes() == (ar_run / "val.bin").read_bytes()
    got = cli_json(["eval", str(out), *SCORE, "--json"], capsys)
    assert got["data"]["val_source"] == str((out / "val.bin").resolve())
    assert got["metrics"] == made["evaluation"]["metrics"]  # the run's, read from its val.bin
    assert made["evaluation"]["data"]["val_source"] == str((ar_run / "val.bin").resolve())


def test_out_must_be_empty_unless_force(ar_run, ar_export, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in ar_export.iterdir()}
    code, _, err = run_cli(["export", str(ar_run), str(ar_export), *SCORE], capsys)
    assert_one_clear_error(code, err, "is not empty", "--force")
    assert {p.name: p.stat().st_mtime_ns for p in ar_export.iterdir()} == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, _, err = run_cli(["export", str(ar_run), str(other), *SCORE, "--force"], capsys)
    assert_one_clear_error(code, err, "--force refuses to replace", "not an lmkit export")
    assert (other / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(["export", str(ar_run), str(ar_run), *SCORE, "--force"], capsys)
    assert_one_clear_error(code, err, "--force refuses to replace")
    copy = tmp_path / "again"
    shutil.copytree(ar_export, copy)
    (copy / "stale.txt").write_text("old")
    cli_json(["export", str(ar_run), str(copy), *SCORE, "--force", "--json"], capsys)
    assert sorted(p.name for p in copy.iterdir()) == FILES  # replaced whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_crash_while_writing_leaves_no_folder(ar_run, tmp_path, monkeypatch):
    real, written = atomic.write_bytes, []

    def failing(path, data, **kw):  # the third file of the folder fails, after two are written
        if Path(path).name == "tokenizer.model" and Path(path).parent.name.startswith("."):
            raise OSError("simulated crash")
        real(path, data, **kw)
        written.append(Path(path).name)

    monkeypatch.setattr(atomic, "write_bytes", failing)
    with pytest.raises(OSError, match="simulated crash"):
        export.export_model(ar_run, tmp_path / "out", device="cpu", max_tokens=512)
    assert {"model.safetensors", "config.json"} <= set(written)
    assert list(tmp_path.iterdir()) == []


def damage(folder: Path, what: str) -> None:
    config = folder / "config.json"
    if what == "no weights":
        (folder / "model.safetensors").unlink()
    elif what == "truncated weights":
        blob = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    elif what == "no tokenizer":
        (folder / "tokenizer.model").unlink()
    elif what == "edited seq_len":
        data = json.loads(config.read_text())
        data["seq_len"] = 64
        config.write_text(json.dumps(data))
    elif what == "bad format":
        data = json.loads(config.read_text())
        data["format"] = "something-else/9"
        config.write_text(json.dumps(data))
    elif what == "torn config":
        config.write_bytes(config.read_bytes()[:100])
    elif what == "wrong trunk":
        data = json.loads(config.read_text())
        data["model"]["config"]["d_model"] = 128
        config.write_text(json.dumps(data))


DAMAGE = {"no weights": "is missing", "truncated weights": "is corrupt",
          "no tokenizer": "does not exist", "edited seq_len": "it was edited",
          "bad format": "not an lmkit export", "torn config": "not valid JSON",
          "wrong trunk": "the model config says"}


@pytest.mark.parametrize("what", list(DAMAGE))
def test_a_damaged_export_is_one_clear_error(ar_export, tmp_path, capsys, what):
    folder = tmp_path / "damaged"
    shutil.copytree(ar_export, folder)
    damage(folder, what)
    code, _, err = run_cli(["eval", str(folder), *SCORE], capsys)
    assert_one_clear_error(code, err, DAMAGE[what])
    code, _, err = run_cli(["sample", str(folder), "--num", "1", "--length", "4",
                            "--device", "cpu"], capsys)
    assert_one_clear_error(code, err, DAMAGE[what])


@pytest.mark.skipif(not FIXTURE_MODEL.exists(), reason="shared tokenizer fixture absent")
def test_a_swapped_tokenizer_of_the_same_size_is_refused(ar_export, tmp_path, capsys):
    folder = tmp_path / "swapped"
    shutil.copytree(ar_export, folder)
    shutil.copy(FIXTURE_MODEL, folder / "tokenizer.model")  # another sp1024 model
    code, _, err = run_cli(["eval", str(folder), *SCORE], capsys)
    assert_one_clear_error(code, err, "is not the tokenizer the model was trained with")


def test_an_export_is_not_packed_or_exported_again(ar_export, tmp_path, capsys):
    code, _, err = run_cli(["pack", str(ar_export), "--bits", "8", "--device", "cpu"], capsys)
    assert_one_clear_error(code, err, "is an `lmkit export` folder", "pack the run")
    code, _, err = run_cli(["export", str(ar_export), str(tmp_path / "x"), *SCORE], capsys)
    assert_one_clear_error(code, err, "is already an export")
    assert sorted(p.name for p in ar_export.iterdir()) == FILES


def test_push_without_huggingface_hub_says_how_to_install(ar_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if absent
    with pytest.raises(LmkitError, match=r"pip install 'lmkit\[hub\]'"):
        export.push_folder(ar_export, "me/tiny")


def test_the_card_is_hub_metadata(ar_export):
    hub = pytest.importorskip("huggingface_hub", reason="the Hub's own card parser")
    card = hub.ModelCard.load(ar_export / "README.md")
    stated = front_matter(ar_export)["lmkit"]["metrics"]
    assert card.data.library_name == "lmkit"
    results = card.data.eval_results
    assert [(r.metric_type, r.metric_value) for r in results] == [
        (m["unit"], m["value"]) for m in stated]
    assert all(r.task_type == "text-generation" and r.dataset_split == "validation"
               for r in results)


# -- slow: the other objective, and a packed artifact --------------------------------------------
@pytest.mark.slow
def test_export_of_an_mdlm_run_evals_like_the_run(tiny_data, tmp_path, capsys):
    run_dir = tiny_run(tiny_data, tmp_path / "mdlm", "mdlm")
    ran, _ = check_export(run_dir, tmp_path / "mdlm-tiny", capsys)
    assert any(m["kind"] == "upper_bound" and m["stderr"] is not None for m in ran["metrics"])
    config = json.loads((tmp_path / "mdlm-tiny" / "config.json").read_text())
    assert config["tokens"]["special"] and config["objective"] == "mdlm"
    code, out, err = run_cli(["sample", str(tmp_path / "mdlm-tiny"), "--num", "1", "--length",
                              "8", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    (sample,) = json.loads(out)["samples"]
    assert len(sample["token_ids"]) == 8 and sample["text"].strip()


@pytest.mark.slow
def test_export_of_a_packed_artifact_evals_like_the_artifact(ar_run, tmp_path, capsys):
    from lmkit.core.pack import Recipe, quantize_and_write

    path = tmp_path / "artifact.int8-rtn.zlib"
    quantize_and_write(runs.load_run(ar_run), path, Recipe(bits=8, cap_bytes=None, small_max=1000))
    ran = cli_json(["eval", str(path), *SCORE, "--json"], capsys)
    out = tmp_path / "int8"
    made = cli_json(["export", str(path), str(out), *SCORE, "--json"], capsys)
    got = cli_json(["eval", str(out), *SCORE, "--json"], capsys)
    assert got["metrics"] == ran["metrics"] == made["evaluation"]["metrics"]
    assert front_matter(out)["lmkit"]["metrics"] == card_figures(ran["metrics"])
    source = json.loads((out / "config.json").read_text())["exported_from"]
    assert source["artifact"]["path"] == str(path.resolve()) and source["artifact"]["bits"] == 8
    # the folder holds the weights the artifact decodes to, not the checkpoint's
    from lmkit.core.artifact import load_artifact

    decoded, _ = load_artifact(path, like=runs.load_run(ar_run).model)
    ours = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(ours[k], v) for k, v in decoded.state_dict().items())
    plain = load_file(str(ar_run / "checkpoint" / "model.safetensors"))
    assert any(not torch.equal(ours[k], plain[k]) for k in ours)


# -- the YAML writer, against PyYAML --------------------------------------------------------------
YAML_PROFILE = settings(max_examples=25, deadline=None, derandomize=True,
                        suppress_health_check=list(HealthCheck))
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text()
           | st.sampled_from(["yes", "No", "null", "~", "1e-05", "0x1F", "- a", "a: b", "#",
                              "---", "\u2028", "\x85", "\ufeff", "'", '"', "\\", " x "]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.text() | st.sampled_from(["on", "1", ""]), c,
                                        max_size=4), max_leaves=16)


@YAML_PROFILE
@given(data=st.dictionaries(st.text(), values, max_size=5))
def test_yaml_writer_reads_back_with_pyyaml(data):
    assert yaml.safe_load(to_yaml(data)) == jsonfile.sanitize(data)


def test_yaml_floats_stay_floats():
    values = [1e-05, 1e16, -2.5e-300, 0.0, -0.0, 3.0, 123456.789, math.pi]
    assert yaml.safe_load(to_yaml({"v": values}))["v"] == values
    assert all(isinstance(v, float) for v in yaml.safe_load(to_yaml({"v": values}))["v"])
