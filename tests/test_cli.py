"""The CLI contract: commands, JSON output, and one clear line (no traceback) for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmkit.cli import main
from lmkit.core.data import write_shard

FIXTURE_MODEL = Path(__file__).resolve().parents[2] / "shared/fixtures/fineweb_1024_bpe.model"
FAST = ["--set", "train.seq_len=32", "--set",
        "train.batch_tokens=256", "--set", "train.val_tokens=512", "--set", "train.dtype=fp32"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_clear_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    assert "Traceback" not in err
    text = " ".join(err.split())  # rich may wrap long lines
    assert text.startswith("Error:"), err
    for needle in needles:
        assert needle in text, (needle, err)


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst)
    return dst


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--objective", "ar", "--preset", "tiny", "--steps", "2", "--data", str(data),
            "--out", str(out), "--quiet", *FAST, *extra]


def test_listing_commands(capsys):
    code, out, _ = run_cli(["objectives", "--json"], capsys)
    assert code == 0
    ar = next(o for o in json.loads(out) if o["name"] == "ar")
    assert ar["distribution"] == "lmkit" and ar["version"]
    code, out, _ = run_cli(["plugins", "--all", "--json"], capsys)
    names = {p["name"] for p in json.loads(out)}
    assert {"lmkit.plugins.ar", "lmkit.plugins.corpora"} <= names
    code, out, _ = run_cli(["plugins", "--json"], capsys)
    assert all(not p["builtin"] for p in json.loads(out))
    code, out, _ = run_cli(["samplers", "--json"], capsys)
    assert code == 0 and isinstance(json.loads(out), list)


def test_train_then_eval_json(data_copy, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(train_args(data_copy, run, "--json"), capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["steps"] == 2 and summary["val"][0]["name"] == "nll"
    code, out, err = run_cli(["eval", str(run), "--json", "--max-tokens", "500", "--stride", "16"],
                             capsys)
    assert code == 0, err
    result = json.loads(out)
    assert [m["name"] for m in result["metrics"]] == ["nll", "nll_sliding"]
    assert result["metrics"][1]["tokens"] == 500
    other = {"fp32": "bf16", "bf16": "fp32"}[result["precision"]]  # default: the run's dtype
    code, out, err = run_cli(["eval", str(run), "--json", "--max-tokens", "500", "--dtype", other],
                             capsys)
    assert code == 0, err
    assert json.loads(out)["precision"] == other


def test_unknown_objective(data_copy, tmp_path, capsys):
    args = train_args(data_copy, tmp_path / "run")
    args[args.index("ar")] = "nope"
    code, _, err = run_cli(args, capsys)
    assert_one_clear_error(code, err, "unknown objective 'nope'", "ar")
    assert not (tmp_path / "run").exists()  # nothing was started


def test_unknown_set_key(data_copy, tmp_path, capsys):
    code, _, err = run_cli(train_args(data_copy, tmp_path / "run", "--set", "model.layers=3"),
                           capsys)
    assert_one_clear_error(code, err, "model.layers")


def test_missing_data_dir(tmp_path, capsys):
    code, _, err = run_cli(train_args(tmp_path / "nowhere", tmp_path / "run"), capsys)
    assert_one_clear_error(code, err, "nowhere")


def test_corrupt_shard(data_copy, tmp_path, capsys):
    shard = next(data_copy.glob("*_train_*.bin"))
    raw = bytearray(shard.read_bytes())
    raw[0:4] = (12345).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    code, _, err = run_cli(train_args(data_copy, tmp_path / "run"), capsys)
    assert_one_clear_error(code, err, shard.name)


def test_truncated_shard(data_copy, tmp_path, capsys):
    shard = next(data_copy.glob("*_val_*.bin"))
    shard.write_bytes(shard.read_bytes()[:-7])
    code, _, err = run_cli(train_args(data_copy, tmp_path / "run"), capsys)
    assert_one_clear_error(code, err, shard.name)


def test_token_ids_beyond_vocab(data_copy, tmp_path, capsys):
    shard = next(data_copy.glob("*_val_*.bin"))
    write_shard(shard, np.array([1, 5, 4000, 7] * 300, dtype=np.uint16))
    code, _, err = run_cli(train_args(data_copy, tmp_path / "run"), capsys)
    assert_one_clear_error(code, err, shard.name, "4000", "1024")


@pytest.mark.skipif(not FIXTURE_MODEL.exists(), reason="shared tokenizer fixture absent")
def test_shards_and_tokenizer_that_do_not_belong_together(data_copy, tmp_path, capsys):
    code, _, err = run_cli(train_args(data_copy, tmp_path / "run", "--tokenizer",
                                      str(FIXTURE_MODEL)), capsys)
    assert_one_clear_error(code, err, "fineweb_1024_bpe.model")


def test_existing_run_is_not_overwritten(data_copy, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(train_args(data_copy, run), capsys)[0] == 0
    before = (run / "checkpoint" / "model.safetensors").read_bytes()
    code, _, err = run_cli(train_args(data_copy, run), capsys)
    assert_one_clear_error(code, err, "--resume auto")
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == before
    code, _, err = run_cli(train_args(data_copy, run, "--resume", "auto", "--steps", "3"), capsys)
    assert code == 0, err


def test_eval_of_a_missing_run(tmp_path, capsys):
    code, _, err = run_cli(["eval", str(tmp_path / "nope")], capsys)
    assert_one_clear_error(code, err, "nope")


def test_python_dash_m_and_no_traceback(tmp_path):
    """The real console entry path: a bad option prints one line and exits non-zero."""
    env = {**os.environ, "LMKIT_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "lmkit", "train", "--set", "train.nope=1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "train.nope" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_pack_then_eval_the_artifact(data_copy, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(train_args(data_copy, run), capsys)[0] == 0
    code, out, err = run_cli(["pack", str(run), "--bits", "8", "--max-tokens", "512", "--json"],
                             capsys)
    assert code == 0, err
    packed = json.loads(out)
    assert packed["artifact_bytes"] == Path(packed["artifact"]).stat().st_size
    assert packed["cap_bytes"] == 16_000_000
    code, out, err = run_cli(["eval", packed["artifact"], "--max-tokens", "512", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["metrics"] == packed["metrics"]


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["train", "--help"], ["presets"]])
def test_help_and_version_do_not_import_torch(args):
    """Commands that need no model answer without importing torch (plugins load, but their
    registration hooks, which import the objectives, run only when entries are needed)."""
    code = ("import sys\nfrom lmkit.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "sys.stdout.write('\\nTORCH' if 'torch' in sys.modules else '\\nNO-TORCH')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.rstrip().endswith("NO-TORCH"), out.stdout[-300:] + out.stderr[-300:]


def test_a_bad_opt_is_reported_as_an_opt(tmp_path, capsys):
    code, _, err = run_cli(["eval", str(tmp_path), "--opt", "foo"], capsys)
    assert code == 1 and "--opt 'foo': expected key=value" in err and "--set" not in err


def test_counts_take_the_forms_people_write(data_copy, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--objective", "ar", "--preset", "tiny", "--data", str(data_copy),
            "--out", str(run), "--tokens", "0.5k", "--json", "--quiet", *FAST]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert json.loads(out)["tokens"] == 512  # 500 tokens is two 256-token steps
    code, out, err = run_cli(["eval", str(run), "--json", "--max-tokens", "1_000"], capsys)
    assert code == 0, err and json.loads(out)["metrics"][0]["tokens"] <= 1000
    code, _, err = run_cli(["eval", str(run), "--max-tokens", "1.5"], capsys)
    assert code != 0 and "not a whole number" in err


def test_runs_lists_runs_newest_first_without_torch(data_copy, tmp_path, capsys):
    for name in ("first", "second"):
        code, _, err = run_cli(train_args(data_copy, tmp_path / "runs" / name), capsys)
        assert code == 0, err
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "run.json").write_text("{not json")
    code, out, err = run_cli(["runs", str(tmp_path), "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    good = [r for r in rows if r["readable"]]
    assert [Path(r["path"]).name for r in good] == ["second", "first"]
    assert all(r["objective"] == "ar" and r["checkpoint_step"] == 2 for r in good)
    assert good[0]["latest_val"]["name"] == "nll" and good[0]["latest_val"]["kind"] == "exact"
    assert any(not r["readable"] for r in rows)  # a damaged run is listed, not a traceback
    code = ("import sys\nfrom lmkit.cli import main\n"
            f"try:\n    main(['runs', {str(tmp_path)!r}])\nexcept SystemExit:\n    pass\n"
            "sys.stdout.write('\\nTORCH' if 'torch' in sys.modules else '\\nNO-TORCH')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.rstrip().endswith("NO-TORCH"), result.stderr[-300:]
