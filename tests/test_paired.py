"""Paired differences under common random numbers, and evaluations kept per protocol."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmkit.core.paired import LN2, paired_difference, same_draws
from tests.test_compare import compare_args, run_cli

DETAIL = {"seed": 7, "stream": "nelbo_mc/any_order", "sequences": 3, "seq_len": 8,
          "documents": False, "bos_given": False, "samples_per_sequence": 4, "replicates": 2,
          "steps": None}


def record(units: torch.Tensor, nbytes: int = 100, **detail) -> dict:
    """A metric record whose value and stderr follow from ``units`` like the meter's do."""
    reps = units.size(1)
    var = units.var(dim=1, unbiased=True) / reps
    return {"name": "nelbo_mc", "kind": "upper_bound", "unit": "bpb", "tokens": 24,
            "bytes": nbytes, "value": float(units.mean(dim=1).sum()) / LN2 / nbytes,
            "stderr": math.sqrt(float(var.sum())) / LN2 / nbytes,
            "detail": {**DETAIL, **detail}}


def test_paired_difference_is_the_difference_with_the_paired_stderr():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(3, 2, generator=g, dtype=torch.float64) * 5  # common Monte-Carlo error
    a_units = 40 + shared + 0.1 * torch.randn(3, 2, generator=g, dtype=torch.float64)
    b_units = 39 + shared + 0.1 * torch.randn(3, 2, generator=g, dtype=torch.float64)
    a, b = record(a_units), record(b_units)
    d = paired_difference(a, a_units, b, b_units)
    assert d is not None
    assert d["difference"] == pytest.approx(a["value"] - b["value"], abs=1e-12)
    # independent computation: per-sequence mean of replicate differences, its variance / R
    diffs = (a_units - b_units).tolist()
    var = sum(((x - y) ** 2) / 2 / 2 for x, y in diffs)  # R=2: sample var = (x−y)²/2
    assert d["stderr"] == pytest.approx(math.sqrt(var) / LN2 / 100, rel=1e-12)
    assert d["independent_stderr"] == pytest.approx(math.hypot(a["stderr"], b["stderr"]))
    assert d["stderr"] < 0.2 * d["independent_stderr"]  # the shared error cancels


def test_no_pairing_without_the_same_draws():
    u = torch.ones(3, 2, dtype=torch.float64)
    a = record(u + torch.tensor([[0.0, 1.0]] * 3, dtype=torch.float64))
    for change in ({"seed": 8}, {"stream": "nelbo_mc/time"}, {"seq_len": 16}):
        b = record(u, **change)
        assert not same_draws(a, b)
        assert paired_difference(a, u, b, u) is None
    assert paired_difference(a, u, record(u, nbytes=99), u) is None
    assert paired_difference(a, u, record(u), u[:2]) is None


def test_compare_pairs_masked_runs_and_keeps_evaluations_per_protocol(tiny_data, tmp_path,
                                                                       capsys):
    code, out, err = run_cli(compare_args(tiny_data, tmp_path / "a", "mdlm,maskrecon",
                                          "--json"), capsys)
    assert code == 0, err
    result = json.loads(out)
    rows = {r["objective"]: r for r in result["rows"]}
    paired = [p for p in result["paired"] if p["metric"] == "nelbo_mc"]
    assert [(p["a"], p["b"]) for p in paired] == [("mdlm", "maskrecon")]
    p = paired[0]
    value = {o: {m["name"]: m for m in rows[o]["metrics"]}["nelbo_mc"] for o in rows}
    assert p["difference"] == pytest.approx(
        value["mdlm"]["value"] - value["maskrecon"]["value"], abs=1e-9)
    assert 0 < p["stderr"] and p["independent_stderr"] == pytest.approx(
        math.hypot(value["mdlm"]["stderr"], value["maskrecon"]["stderr"]))
    md = (tmp_path / "a" / "report.md").read_text()
    assert "## Paired differences" in md and "mdlm − maskrecon" in md

    # the comparison kept its evaluations under their protocol and left eval.json alone
    mdlm = tmp_path / "a" / "runs" / "mdlm"
    kept = sorted((mdlm / "evals").glob("*.json"))
    assert len(kept) == 1 and not (mdlm / "eval.json").exists()
    assert (mdlm / "evals" / kept[0].name.replace(".json", ".units.safetensors")).exists()

    # `lmkit eval` on the full stream writes eval.json and a second record, not over the first
    before = kept[0].read_bytes()
    code, out, err = run_cli(["eval", str(mdlm), "--json"], capsys)
    assert code == 0, err
    full = json.loads(out)
    assert json.loads((mdlm / "eval.json").read_text()) == full
    assert {full["files"]["latest"], full["files"]["record"]} == {
        str((mdlm / "eval.json").resolve()),
        *(str(p.resolve()) for p in (mdlm / "evals").glob("*.json") if p != kept[0])}
    assert len(list((mdlm / "evals").glob("*.json"))) == 2 and kept[0].read_bytes() == before
    assert full["metrics"][0]["tokens"] > value["mdlm"]["tokens"]  # each names its tokens

    # comparing the existing runs reuses the kept results: same numbers, nothing re-evaluated
    mtime = kept[0].stat().st_mtime_ns
    run_dirs = [r["run"] for r in result["rows"]]
    code, out, err = run_cli(["compare", *run_dirs, "--json", "--out", str(tmp_path / "b"),
                              "--max-tokens", "1024"], capsys)
    assert code == 0, err
    again = json.loads(out)
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in result["rows"]]
    assert again["paired"] == result["paired"] and kept[0].stat().st_mtime_ns == mtime

    # and never over an existing comparison
    code, out, err = run_cli(["compare", *run_dirs, "--json", "--out", str(tmp_path / "b")],
                             capsys)
    assert code == 1 and "already holds a comparison" in err + out


def test_the_protocol_key_ignores_the_order_of_options():
    from lmkit.core.evalstore import protocol_key

    a = {"checkpoint_step": 3, "max_tokens": None, "options": {"samples": 4, "chain_k": 8}}
    b = {"options": {"chain_k": 8, "samples": 4}, "max_tokens": None, "checkpoint_step": 3}
    assert protocol_key(a) == protocol_key(b) and protocol_key(a).startswith("step3-alltok-")
    assert protocol_key({**a, "seed": 1}) != protocol_key(a)
