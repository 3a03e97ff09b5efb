"""`lmkit record`: a parameter-golf record folder from tiny runs, its schema, its byte count,
its honest compliance block, and `--check` catching a tampered folder."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmkit.core.record import check_record, schema, write_record
from lmkit.core.record import summary as summary_mod
from lmkit.errors import LmkitError
from tests.test_cli import assert_one_clear_error, run_cli

jsonschema = pytest.importorskip("jsonschema")

FAST = ["train.seq_len=32", "train.batch_tokens=256", "train.log_every=2",
        "train.val_tokens=256", "train.dtype=fp32"]
CALIB = 1024
DATE = "2026-05-01"


# -- cheap: the pure parts and bad input --------------------------------------------------------
def _seed(seed=1, *, train_seconds=10.0, eval_time_s=5.0, bytes_total=1000, eval_targets=100,
          val_tokens=100, target_tokens=100, leak=None, env=None):
    return {"seed": seed, "train_seconds": train_seconds, "eval_time_s": eval_time_s,
            "bytes_total": bytes_total, "eval_targets": eval_targets, "val_tokens": val_tokens,
            "target_tokens": target_tokens, "leak_check": leak,
            "train_environment": env or {"device": "cpu"}}


OK_LEAK = {"dir": "d", "ok": True, "leak": False, "problems": [], "overlap_documents": 0}


def test_compliance_is_computed_and_never_true_by_default():
    c = summary_mod.compliance([_seed(s, leak=OK_LEAK) for s in (1, 2, 3)], 16_000_000)
    assert c["three_seeds"] and c["train_under_600s_strict"] and c["eval_under_600s"]
    assert c["no_validation_training_leak"] is True and c["timed_on_8xh100"] is False
    # strict: 600.0 logged seconds is not under 600; the limit is in decimal bytes
    c = summary_mod.compliance([_seed(1, train_seconds=600.0, bytes_total=16_000_001),
                                _seed(2, train_seconds=599.999, bytes_total=16_000_000)],
                               16_000_000)
    assert c["train_under_600s_strict"] is False and c["artifact_under_16mb"] is False
    assert c["three_seeds"] is False
    # unknown stays null: no data to check, a cuda run whose GPU was not recorded
    c = summary_mod.compliance([_seed(1, env={"device": "cuda:0"})], 10)
    assert c["no_validation_training_leak"] is None and c["timed_on_8xh100"] is None
    assert c["bytes_under_cap"] is False and c["artifact_under_16mb"] is True
    leak = {**OK_LEAK, "ok": False, "leak": True, "overlap_documents": 2}
    assert summary_mod.compliance([_seed(1, leak=leak), _seed(2)], 10)[
        "no_validation_training_leak"] is False  # a found leak outweighs an unknown
    h100 = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}
    assert summary_mod.on_8xh100(h100) is False  # one process: one GPU
    assert summary_mod.on_8xh100({**h100, "world_size": 8}) is True
    assert summary_mod.compliance([_seed(1, val_tokens=99)], 10)[
        "val_tokens_equal_target_tokens"] is False


def test_summary_matches_the_statistics_module():
    seeds = [{**dict.fromkeys(summary_mod.SUMMARY_FIELDS, 0), "val_bpb": v, "steps": n}
             for v, n in ((1.25, 10), (1.5, 12), (1.0, 11))]
    s = summary_mod.summarize(seeds)
    assert s["val_bpb"]["mean"] == pytest.approx(statistics.mean([1.25, 1.5, 1.0]))
    assert s["val_bpb"]["std"] == pytest.approx(statistics.stdev([1.25, 1.5, 1.0]))
    assert (s["steps"]["min"], s["steps"]["max"], s["steps"]["n"]) == (10, 12, 3)
    one = summary_mod.summarize(seeds[:1])
    assert one["val_bpb"]["std"] is None and one["val_bpb"]["mean"] == 1.25
    seeds[1]["val_bpb"] = None  # a non-finite figure is null in JSON: no mean is made up
    assert summary_mod.summarize(seeds)["val_bpb"]["mean"] is None


def test_schema_is_valid_and_strict():
    jsonschema.Draft202012Validator.check_schema(schema())
    errors = list(jsonschema.Draft202012Validator(schema()).iter_errors({"format": "x"}))
    assert any("'seed_results' is a required property" in e.message for e in errors)


def test_check_reports_a_folder_that_fails_the_schema(tmp_path, capsys):
    (tmp_path / "submission.json").write_text(json.dumps({"format": "lmkit-record/1"}))
    result = check_record(tmp_path)
    assert not result["ok"] and all(f.startswith("schema:") for f in result["failures"])
    code, out, _ = run_cli(["record", "--check", str(tmp_path)], capsys)
    assert code == 1 and "FAIL schema:" in out and "failure(s)" in out


def test_damaged_inputs_give_one_line_errors(tmp_path, capsys):
    cases = [
        (["record", str(tmp_path / "nope")], ["does not exist"]),
        (["record", str(tmp_path)], ["not an lmkit run directory"]),
        (["record"], ["one run directory per seed"]),
        (["record", "--check", str(tmp_path / "nope")], ["does not exist"]),
        (["record", "--check", str(tmp_path)], ["not a record folder"]),
        (["record", "--check", str(tmp_path), str(tmp_path)], ["pass no run directories"]),
    ]
    for args, needles in cases:
        code, _, err = run_cli(args, capsys)
        assert_one_clear_error(code, err, *needles)
    (tmp_path / "submission.json").write_bytes(b"{not json")
    code, _, err = run_cli(["record", "--check", str(tmp_path)], capsys)
    assert_one_clear_error(code, err, "not valid JSON")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c,
                                                                              max_size=4),
                        max_leaves=20))
def test_check_survives_any_submission_json(obj):
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "submission.json").write_text(json.dumps(obj))
        try:
            result = check_record(tmp)
        except LmkitError:
            return
        assert result["ok"] is False and result["failures"]


# -- end to end on three tiny runs (slow: three trainings, packs and evaluations) --------------
def _train(tiny_data, run_dir, seed, steps=3):
    from lmkit.core.config import resolve_config
    from lmkit.core.data import open_data
    from lmkit.core.train import train

    cfg = resolve_config(preset="tiny", flags={"train.steps": steps, "data.path": str(tiny_data)},
                         sets=[*FAST, f"train.seed={seed}"])
    train(cfg, open_data(tiny_data), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def seed_runs(tiny_data, tmp_path_factory):
    """Three seeds of one tiny AR config; seed 1 already packed (`lmkit pack`'s artifact)."""
    from lmkit.core import runs
    from lmkit.core.pack import Recipe, quantize_and_write

    root = tmp_path_factory.mktemp("record")
    dirs = [_train(tiny_data, root / f"ar-s{s}", s) for s in (1, 2, 3)]
    recipe = Recipe(calib_tokens=CALIB)
    quantize_and_write(runs.load_run(dirs[0]), dirs[0] / recipe.file_name, recipe)
    return dirs


@pytest.fixture(scope="module")
def record(seed_runs, tmp_path_factory):
    import datetime as dt

    out = tmp_path_factory.mktemp("out")
    sub = write_record(seed_runs, out, author="Ada", github_id="ada", device="cpu",
                       calib_tokens=CALIB, date=dt.date.fromisoformat(DATE))
    return Path(sub["path"]), sub


def _last_train_seconds(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in lines if r["type"] == "train"][-1]


@pytest.mark.slow
def test_record_folder_of_three_seeds(seed_runs, record):
    folder, sub = record
    assert folder.relative_to(folder.parents[2]).as_posix() == \
        f"records/track_non_record_16mb/{DATE}_lmkit_ar_tiny"
    on_disk = json.loads((folder / "submission.json").read_text())
    jsonschema.validate(on_disk, schema())
    assert {p.name for p in folder.iterdir()} == {
        "submission.json", "README.md", "requirements.txt", "code", "seed_1", "seed_2", "seed_3"}
    # bytes_total: exactly the sizes on disk of what it says it counts
    counted = on_disk["bytes_counted"]
    assert on_disk["bytes_total"] == sum(os.path.getsize(folder / p) for p in counted)
    code = sorted(p.relative_to(folder).as_posix() for p in (folder / "code").rglob("*")
                  if p.is_file())
    assert sorted(counted[1:]) == code and "code/lmkit/core/record/write.py" in code
    assert on_disk["code_bytes"] == sum(os.path.getsize(folder / p) for p in code)
    seeds = [on_disk["seed_results"][k] for k in ("1", "2", "3")]
    for run_dir, s in zip(seed_runs, seeds, strict=True):
        art = folder / s["artifact"]
        assert s["artifact_bytes"] == os.path.getsize(art)
        assert s["bytes_total"] == s["artifact_bytes"] + on_disk["code_bytes"]
        last = _last_train_seconds(run_dir)  # the source run's own log, not the copy
        assert (s["steps"], s["train_seconds"]) == (last["step"], last["seconds"])
        assert s["train_wallclock_ms"] == round(1000 * last["seconds"])
        assert (folder / s["log"]).read_bytes() == (run_dir / "metrics.jsonl").read_bytes()
        assert s["val_tokens"] <= s["eval_targets"] == s["target_tokens"]
        assert s["val_bpb"] == s["quantized_val_bpb"] != s["pre_quant_val_bpb"]
    assert on_disk["bytes_total"] == max(s["bytes_total"] for s in seeds)
    assert seeds[0]["artifact_reused"] and not seeds[1]["artifact_reused"]
    assert (folder / seeds[0]["artifact"]).read_bytes() == \
        (seed_runs[0] / "artifact.int6-gptq.lzma").read_bytes()
    values = [s["val_bpb"] for s in seeds]
    assert on_disk["val_bpb"] == pytest.approx(statistics.mean(values), rel=1e-12)
    assert on_disk["val_bpb_std"] == pytest.approx(statistics.stdev(values), rel=1e-9)
    c = on_disk["compliance"]
    assert c["train_under_600s_strict"] is all(
        _last_train_seconds(d)["seconds"] < 600 for d in seed_runs)
    assert c["three_seeds"] is True and c["artifact_under_16mb"] is True
    assert c["full_validation_targets"] is True and c["no_validation_training_leak"] is True
    # AR's non-overlapping windows leave a tail unscored: val_tokens < target_tokens, said so
    assert c["val_tokens_equal_target_tokens"] is (seeds[0]["val_tokens"]
                                                   == seeds[0]["target_tokens"])
    assert c["timed_on_8xh100"] is False  # trained on a CPU
    assert on_disk["author"] == "Ada" and on_disk["metric"]["kind"] == "exact"
    text = (folder / "README.md").read_text()
    assert "| 1 | nll | `=` exact |" in text and f"{seeds[2]['val_bpb']:.4f}" in text
    reqs = (folder / "requirements.txt").read_text()
    assert f"torch=={__import__('torch').__version__}" in reqs and "numpy==" in reqs
    assert check_record(folder) == {"folder": str(folder), "ok": True, "failures": [],
                                    "notes": []}


@pytest.mark.slow
def test_record_value_is_the_artifact_read_back(record):
    """The seed's val_bpb equals an independent `lmkit eval` of its artifact file."""
    from lmkit.core.evaluate import evaluate_artifact

    folder, sub = record
    s = sub["seed_results"]["2"]
    again = evaluate_artifact(folder / s["artifact"], device="cpu")["metrics"][0]
    assert again["value"] == pytest.approx(s["val_bpb"], rel=1e-12)
    assert again["tokens"] == s["val_tokens"]


@pytest.mark.slow
def test_two_seeds_and_an_over_cap_folder_are_written_but_not_compliant(seed_runs, tmp_path,
                                                                        capsys):
    code, out, err = run_cli(["record", str(seed_runs[2]), str(seed_runs[0]), "--out",
                              str(tmp_path), "--name", "two", "--cap-bytes", "500000",
                              "--calib-tokens", str(CALIB), "--max-tokens", "2048",
                              "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    sub = json.loads(out)
    folder = Path(sub["path"])
    assert sub["seeds"] == [1, 3] and folder.is_dir()
    c = sub["compliance"]
    assert c["three_seeds"] is False and c["bytes_under_cap"] is False
    assert c["full_validation_targets"] is False  # a 2048-target prefix was scored
    assert sub["bytes_total"] > 500_000 and "without a cap" in \
        sub["seed_results"]["1"]["artifact_note"]
    assert check_record(folder)["ok"]
    code, _, err = run_cli(["record", str(seed_runs[0]), "--out", str(tmp_path), "--name",
                            "two"], capsys)
    assert_one_clear_error(code, err, "already exists", "--force")


@pytest.mark.slow
def test_tampered_folders_fail_check(record, tmp_path, capsys):
    folder, _ = record

    def tampered(name, edit):
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        edit(copy)
        return check_record(copy)["failures"]

    def better_bpb(d):
        sub = json.loads((d / "submission.json").read_text())
        sub["seed_results"]["1"]["val_bpb"] -= 0.1
        (d / "submission.json").write_text(json.dumps(sub))

    failures = tampered("bpb", better_bpb)
    assert any(f.startswith("seed 1 val_bpb") for f in failures)
    assert any(f.startswith("summary") for f in failures)
    assert any("README.md differs" in f for f in failures)

    def more_code(d):
        with open(d / "code" / "lmkit" / "__init__.py", "a") as fh:
            fh.write("# one more line\n")

    assert any(f.startswith("code_bytes") for f in tampered("code", more_code))

    def faster_training(d):
        log = d / "seed_2" / "metrics.jsonl"
        lines = [json.loads(x) for x in log.read_text().splitlines() if x]
        for r in lines:
            if r["type"] == "train":
                r["seconds"] = r["seconds"] / 2
        log.write_text("".join(json.dumps(r) + "\n" for r in lines))

    failures = tampered("train", faster_training)
    assert any(f.startswith("seed 2 train_seconds") for f in failures)

    def claim_compliance(d):
        sub = json.loads((d / "submission.json").read_text())
        sub["compliance"]["timed_on_8xh100"] = True
        (d / "submission.json").write_text(json.dumps(sub))

    assert any(f.startswith("compliance") for f in tampered("claim", claim_compliance))
    code, out, _ = run_cli(["record", "--check", str(tmp_path / "claim")], capsys)
    assert code == 1 and "FAIL compliance" in out

    def drop_artifact(d):
        (d / "seed_3" / "artifact.int6-gptq.lzma").unlink()

    assert any("artifact" in f for f in tampered("noart", drop_artifact))


@pytest.mark.slow
def test_runs_that_are_not_seeds_of_one_config_are_refused(seed_runs, tmp_path):
    with pytest.raises(LmkitError, match="both have seed 2"):
        write_record([seed_runs[1], seed_runs[1]], tmp_path)
    other = tmp_path / "lr"
    shutil.copytree(seed_runs[0], other)
    meta = json.loads((other / "run.json").read_text())
    meta["config"]["train"]["seed"] = 9
    meta["config"]["optim"]["lr"] = 0.5
    (other / "run.json").write_text(json.dumps(meta))
    with pytest.raises(LmkitError, match="optim.lr"):
        write_record([seed_runs[0], other], tmp_path)
    assert not (tmp_path / "records").exists()
