"""`lmkit pack` end to end on a tiny trained AR run: artifact, cap, round-trip metrics, CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lmkit.cli.pack import bench_pack_command, pack_command
from lmkit.core import artifact, build, capfit, quant, runs
from lmkit.core import pack as pack_mod
from lmkit.core.bench import pack as bench_pack
from lmkit.core.config import resolve_config
from lmkit.core.data import load_val_tokens, open_data
from lmkit.core.evaluate import evaluate_artifact, evaluate_loaded
from lmkit.core.pack import pack_run
from lmkit.core.train import train
from lmkit.errors import LmkitError

FAST = ["train.seq_len=32", "train.batch_tokens=256", "train.log_every=4",
        "train.val_tokens=256", "train.dtype=fp32"]
EVAL = {"max_tokens": 1024, "device": "cpu"}
CALIB = 2048
CONTRACT = {"artifact", "artifact_bytes", "cap_bytes", "bits", "method", "compression",
            "pruned_values", "metrics", "metrics_before", "penalty"}
METRIC_KEYS = {"name", "kind", "value", "unit", "stderr", "tokens", "bytes", "detail"}


def tiny_run(tiny_data, run_dir, steps=8, extra=()):
    cfg = resolve_config(preset="tiny", flags={"train.steps": steps, "data.path": str(tiny_data)},
                         sets=[*FAST, *extra])
    train(cfg, open_data(tiny_data), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def ar_run(tiny_data, tmp_path_factory):
    return tiny_run(tiny_data, tmp_path_factory.mktemp("pack") / "run")


@pytest.fixture(scope="module")
def packed6(ar_run):
    return pack_run(ar_run, bits=6, calib_tokens=CALIB, **EVAL)


def test_pack_int6_gptq_json_contract(ar_run, packed6):
    r = packed6
    assert CONTRACT <= set(r)
    assert (r["bits"], r["method"], r["compression"]) == (6, "gptq", "lzma")
    path = ar_run / "artifact.int6-gptq.lzma"
    assert r["artifact"] == str(path) and r["artifact_bytes"] == os.path.getsize(path)
    assert r["cap_bytes"] == 16_000_000 and r["artifact_bytes"] <= r["cap_bytes"]
    assert r["pruned_values"] == 0 and r["fits"]
    assert r["tensors"]["int6-gptq"] == 12 and r["tensors"]["int8-baseline"] == 1  # + embedding
    assert r["calibration"]["tokens_per_layer"] >= CALIB
    assert json.loads((ar_run / "pack.json").read_text()) == json.loads(json.dumps(r))
    for key in ("metrics", "metrics_before"):
        assert [m["name"] for m in r[key]] == ["nll"]
        assert all(METRIC_KEYS <= set(m) and m["unit"] == "bpb" for m in r[key])
    before, after = r["metrics_before"][0], r["metrics"][0]
    assert after["tokens"] == before["tokens"] == 1024 and after["bytes"] == before["bytes"]
    (p,) = r["penalty"]
    assert p["delta"] == pytest.approx(after["value"] - before["value"])
    assert abs(p["delta"]) < 0.05 and after["value"] != before["value"]


def test_pack_int8_baseline_round_trip(ar_run, tmp_path):
    # small_max lowered so the tiny model's matrices really take the int8 path
    r = pack_run(ar_run, bits=8, small_max=1000, out=tmp_path / "a8", **EVAL)
    assert (r["method"], r["compression"]) == ("rtn", "zlib")
    assert r["tensors"]["int8-baseline"] == 13 and r["calibration"] is None
    assert r["artifact_bytes"] == os.path.getsize(tmp_path / "a8")
    assert abs(r["penalty"][0]["delta"]) < 0.05
    manifest, stored = artifact.read_artifact(tmp_path / "a8")
    assert manifest["run"] == str(ar_run.resolve()) and manifest["bits"] == 8
    assert all(int(t.data.to(int).abs().max()) <= 127 for t in stored if t.scheme == "int")


def test_pack_prunes_to_a_reachable_cap(ar_run, tmp_path):
    run = runs.load_run(ar_run)
    tensors = quant.quantize_model(run.model, bits=6, method="rtn")
    meta = pack_mod.artifact_meta(run, 6, "rtn", "lzma")
    unpruned = len(capfit.fit_to_cap(tensors, meta, "lzma", None).data)
    cands = capfit.prune_candidates(tensors)
    floor = len(capfit.fit_to_cap(capfit.apply_pruning(tensors, cands, len(cands)), meta, "lzma",
                                 None).data)
    cap = (unpruned + floor) // 2
    r = pack_run(ar_run, bits=6, method="rtn", cap_bytes=cap, out=tmp_path / "a", **EVAL)
    assert r["unpruned_bytes"] == unpruned > cap >= r["artifact_bytes"]
    assert 0 < r["pruned_values"] < len(cands)
    assert r["artifact_bytes"] == os.path.getsize(tmp_path / "a")
    assert abs(r["penalty"][0]["delta"]) < 0.05


def test_impossible_cap_is_an_error_and_leaves_no_file(ar_run, tmp_path):
    before = sorted(os.listdir(ar_run))
    out = tmp_path / "never"
    with pytest.raises(LmkitError, match="cannot fit --cap-bytes 10,000"):
        pack_run(ar_run, bits=6, method="rtn", cap_bytes=10_000, out=out, **EVAL)
    assert not out.exists() and os.listdir(tmp_path) == []
    with pytest.raises(LmkitError, match="cannot fit"):
        pack_run(ar_run, bits=8, cap_bytes=10_000, **EVAL)  # default path, in the run dir
    assert sorted(os.listdir(ar_run)) == before


def test_evaluate_artifact_matches_the_pack(ar_run, packed6, tmp_path):
    result = evaluate_artifact(packed6["artifact"], **EVAL)
    assert result["metrics"] == packed6["metrics"]
    assert result["artifact"]["bytes"] == packed6["artifact_bytes"]
    assert result["artifact"]["bits"] == 6 and result["objective"] == "ar"
    moved = tmp_path / "elsewhere.bin"  # away from its run: found through the manifest
    shutil.copy(packed6["artifact"], moved)
    assert evaluate_artifact(moved, **EVAL)["metrics"] == packed6["metrics"]


def test_evaluate_artifact_needs_its_run(ar_run, packed6, tmp_path):
    lonely = tmp_path / "lonely.bin"
    data = artifact.decode_artifact(open(packed6["artifact"], "rb").read(), "a")
    manifest, tensors = artifact.deserialize(data, "a")
    manifest["run"] = str(tmp_path / "gone")
    lonely.write_bytes(artifact.encode_artifact(artifact.serialize(tensors, manifest), "lzma"))
    with pytest.raises(LmkitError, match="cannot find its run directory"):
        evaluate_artifact(lonely, **EVAL)


def test_calibration_reads_training_shards_only(ar_run, monkeypatch):
    seen = []

    class Spy(build.RotatingLoader):
        def __init__(self, shards, **kwargs):
            seen.extend(p.name for p in shards)
            super().__init__(shards, **kwargs)

    monkeypatch.setattr(build, "RotatingLoader", Spy)
    run = runs.load_run(ar_run)
    hessians, rows = pack_mod.calibrate(run, 1000)
    assert seen and all("_train_" in name for name in seen)
    assert rows >= 1000 and len(hessians) == 12
    again, _ = pack_mod.calibrate(run, 1000)  # seeded: the same Hessians twice
    assert all((again[k] == hessians[k]).all() for k in hessians)


def test_pack_cli_json(ar_run, tmp_path):
    res = CliRunner().invoke(pack_command, [str(ar_run), "--bits", "8", "--max-tokens", "512",
                                            "--device", "cpu", "--dtype", "bf16", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert CONTRACT <= set(r) and r["bits"] == 8 and r["compression"] == "zlib"
    assert r["precision"] == "bf16"  # the tiny run trained in fp32
    assert r["artifact_bytes"] == os.path.getsize(r["artifact"])
    res = CliRunner().invoke(pack_command, [str(tmp_path / "missing"), "--json"])
    assert isinstance(res.exception, LmkitError)  # main() turns it into one line


def test_bench_pack_cli_json(ar_run):
    files = sorted(ar_run.iterdir())
    res = CliRunner().invoke(bench_pack_command, [str(ar_run), "--max-tokens", "512",
                                                  "--blocks", "4", "--bits", "6,4",
                                                  "--calib-tokens", "1024", "--device", "cpu",
                                                  "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["precision"] == "fp32" and r["blocks"] == 4 and r["bits"] == [6, 4]
    (entry,) = r["runs"]
    assert [row["recipe"] for row in entry["rows"]] == [
        "int8/zlib", "int6 rtn/lzma", "int6 gptq/lzma", "int4 rtn/lzma", "int4 gptq/lzma"]
    assert entry["metric"] == "nll" and entry["targets"] == 512
    int8, rtn6, gptq6, rtn4, gptq4 = (row for row in entry["rows"])
    assert rtn6["artifact_bytes"] < int8["artifact_bytes"]  # tiny: int8 keeps fp16 small tensors
    assert rtn4["artifact_bytes"] < rtn6["artifact_bytes"]
    for row in entry["rows"]:
        assert row["penalty"] == pytest.approx(row["after"] - entry["before"])
        assert row["penalty_stderr"] > 0
    by_bits = {c["bits"]: c for c in entry["gptq_vs_rtn"]}
    assert by_bits[4]["gptq_minus_rtn"] == pytest.approx(gptq4["after"] - rtn4["after"])
    assert by_bits[6]["resolved"] == (abs(by_bits[6]["gptq_minus_rtn"]) > 2 * by_bits[6]["stderr"])
    assert sorted(ar_run.iterdir()) == files  # the bench leaves the run untouched
    bad = CliRunner().invoke(bench_pack_command, [str(ar_run), "--bits", "6,9"])
    assert bad.exit_code == 2 and "2..8" in bad.output


def test_blocks_score_each_target_once(ar_run):
    """Blocks tile the prefix: their bits add up to one pass over the same targets."""
    run = runs.load_run(ar_run, "cpu")
    blocks = bench_pack.val_blocks(run, 4, 1000)
    seq = run.config.train.seq_len
    assert all(b.numel() - 1 == 1000 // 4 // seq * seq for b in blocks)
    stream = load_val_tokens(open_data(run.meta["data"]["dir"]), None)
    assert torch.equal(torch.cat([blocks[0][:1], *(b[1:] for b in blocks)]),
                       stream[:sum(b.numel() - 1 for b in blocks) + 1])
    _, bits, nbytes = bench_pack.block_bits(run, run.model, blocks, dtype="fp32")
    whole = evaluate_loaded(run, val_tokens=stream[:len(blocks) * (blocks[0].numel() - 1) + 1],
                            purpose="validation", dtype="fp32")["metrics"][0]
    assert nbytes.sum() == whole["bytes"]
    assert bits.sum() / nbytes.sum() == pytest.approx(whole["value"], rel=1e-6)
    with pytest.raises(LmkitError, match="--blocks"):
        bench_pack.val_blocks(run, 1, 1000)
    with pytest.raises(LmkitError, match="raise --max-tokens"):
        bench_pack.val_blocks(run, 64, 1000)


def test_paired_difference_is_the_ratio_estimator():
    rng = np.random.default_rng(0)
    nbytes = rng.integers(900, 1100, size=6).astype(float)
    before = rng.normal(2.0, 0.1, size=6) * nbytes
    after = before + rng.normal(0.01, 0.002, size=6) * nbytes
    diff, se = bench_pack.paired_difference(after, before, nbytes)
    assert diff == pytest.approx((after - before).sum() / nbytes.sum())
    # Equal blocks: the ratio estimator is the mean of per-block differences, stderr sd/sqrt(n).
    same = np.full(6, 1000.0)
    per_block = rng.normal(0.01, 0.002, size=6)
    diff, se = bench_pack.paired_difference(per_block * same, np.zeros(6), same)
    assert diff == pytest.approx(per_block.mean())
    assert se == pytest.approx(per_block.std(ddof=1) / np.sqrt(6))
    # A constant shift is paired away: identical per-block penalties have no spread.
    _, se = bench_pack.paired_difference(before + 0.01 * nbytes, before, nbytes)
    assert se == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow  # ~2 s on an idle machine; a minute when the CPU is shared
def test_gptq_beats_rtn_on_a_trained_model(tiny_data, tmp_path):
    """At equal bits GPTQ's round trip costs less than round-to-nearest.

    3 bits, so that the gap stands well above the noise of a 1024-token score on a d=64 model
    (measured: rtn +0.0029, gptq +0.0013 bpb; at 6 bits both are within ±0.0003 of zero).
    """
    run_dir = tiny_run(tiny_data, tmp_path / "run", steps=60, extra=["optim.lr=0.01"])
    common = dict(bits=3, cap_bytes=None, calib_tokens=8192, **EVAL)
    rtn = pack_run(run_dir, method="rtn", **common)["penalty"][0]["delta"]
    gptq = pack_run(run_dir, method="gptq", **common)["penalty"][0]["delta"]
    assert rtn > 0.001 and gptq < 0.75 * rtn


def test_bad_recipes_fail_before_any_work(ar_run):
    for kwargs, match in (({"bits": 12}, "--bits 12"), ({"method": "awq"}, "--method"),
                          ({"compression": "zstd"}, "--compression")):
        with pytest.raises(LmkitError, match=match):
            pack_run(ar_run, **kwargs, **EVAL)


@pytest.mark.parametrize("objective", ["mdlm", "maskrecon"])
def test_pack_int6_for_masked_objectives(tiny_data, tmp_path, objective):
    """Quantization sees only the trunk; the round trip is re-scored by the run's objective."""
    run_dir = tiny_run(tiny_data, tmp_path / objective, steps=4,
                       extra=[f"objective={objective}"])
    result = pack_run(run_dir, bits=6, calib_tokens=CALIB,
                      options={"samples": 2, "steps": "", "chain_k": 16}, **EVAL)
    assert CONTRACT <= set(result)
    assert result["artifact_bytes"] == os.path.getsize(result["artifact"]) <= 16_000_000
    names = [m["name"] for m in result["metrics"]]
    assert names == [m["name"] for m in result["metrics_before"]]
    assert "nelbo_mc" in names and "chain_rule" in names
    for before, after in zip(result["metrics_before"], result["metrics"], strict=True):
        assert (before["tokens"], before["bytes"]) == (after["tokens"], after["bytes"])
        assert abs(after["value"] - before["value"]) < 0.1


def test_sample_accepts_an_artifact(ar_run, packed6):
    from lmkit.core.generate import sample_run

    from_artifact = sample_run(packed6["artifact"], num=2, length=6, device="cpu")
    from_run = sample_run(ar_run, num=2, length=6, device="cpu")
    assert [len(s["token_ids"]) for s in from_artifact] == [6, 6]
    assert from_artifact[0]["sampler"] == from_run[0]["sampler"] == "ar"


def test_bench_eval_repeats_report_the_median_of_identical_evaluations(ar_run):
    """``lmkit bench eval --repeats 3``: the same figures each time, each estimator's seconds
    the median of its three passes, listed."""
    from lmkit.cli import bench_eval

    res = CliRunner().invoke(bench_eval, [str(ar_run), "--max-tokens", "512", "--repeats", "3",
                                          "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    (row,) = r["rows"]
    assert r["repeats"] == 3 and row["metric"] == "nll" and len(row["seconds_rounds"]) == 3
    assert row["seconds"] == sorted(row["seconds_rounds"])[1]
    assert row["seconds_per_1m_tokens"] == pytest.approx(row["seconds"] * 1e6 / row["tokens"])
    single = json.loads(CliRunner().invoke(bench_eval, [str(ar_run), "--max-tokens", "512",
                                                        "--device", "cpu", "--json"]).stdout)
    assert single["repeats"] == 1 and single["rows"][0]["value"] == row["value"]
    bad = CliRunner().invoke(bench_eval, [str(ar_run), "--repeats", "0"])
    assert bad.exit_code == 2 and "--repeats" in bad.output
