"""`lmkit compare --seeds`: runs per seed, mean ± std across seeds, Welch tests vs a baseline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmkit.core.compare import (
    Entry,
    baseline_tests,
    budget_basis,
    paired_rows,
    seed_summary,
    to_json,
    to_markdown,
)
from lmkit.core.runs import read_run_state
from lmkit.core.stats import student_t_cdf
from tests.test_compare import FAST, run_cli

CONFIG = {"objective": "x", "train": {"seed": 0, "steps": 4, "tokens": 0, "time": 0.0,
                                      "val_every": 1}, "model": {"n_layer": 2}}


def metric(name, kind, value, stderr=None, tokens=512):
    return {"name": name, "kind": kind, "value": value, "unit": "bpb", "stderr": stderr,
            "tokens": tokens, "bytes": 1200, "detail": {}}


def entry(objective, seed, metrics, **train):
    config = {**CONFIG, "objective": objective,
              "train": {**CONFIG["train"], "seed": seed, **train}}
    return Entry(objective, Path(f"/r/{objective}-s{seed}"), 1000, 1024, 2.0, metrics, {},
                 seed=seed, config=config)


AR = [2.10, 2.14, 2.09]
MDLM = [2.31, 2.22, 2.27]


def seeded():
    return ([entry("ar", s, [metric("nll", "exact", v)])
             for s, v in zip((1, 2, 3), AR, strict=True)]
            + [entry("mdlm", s, [metric("nelbo_mc", "upper_bound", v, 0.01 * s),
                                 metric("chain_rule", "exact", v + 0.1)])
               for s, v in zip((1, 2, 3), MDLM, strict=True)])


def test_seed_summary_is_mean_sample_std_and_rms_stderr():
    rows = {(r["objective"], r["metric"]): r for r in seed_summary(seeded())}
    ar, mdlm = rows["ar", "nll"], rows["mdlm", "nelbo_mc"]
    assert ar["n"] == 3 and ar["seeds"] == [1, 2, 3] and ar["stderr_rms"] is None
    assert ar["mean"] == pytest.approx(np.mean(AR)) and ar["std"] == pytest.approx(
        np.std(AR, ddof=1))
    assert mdlm["stderr_rms"] == pytest.approx(np.sqrt(np.mean(np.square([.01, .02, .03]))))
    assert ("mdlm", "chain_rule") in rows
    # a single seed: no across-seed rows, the one-row-per-run output is unchanged
    single = [entry("ar", 1, [metric("nll", "exact", 2.0)]),
              entry("mdlm", 1, [metric("nelbo_mc", "upper_bound", 2.2, 0.01)])]
    assert seed_summary(single) == [] and baseline_tests(single, None) == []
    assert "Across seeds" not in to_markdown(single)


def test_baseline_test_is_welch_on_primary_metrics_checked_by_hand():
    entries = seeded()
    (test,) = baseline_tests(entries, None)  # default baseline: ar
    assert (test["objective"], test["metric"], test["baseline"], test["baseline_metric"]) == (
        "mdlm", "nelbo_mc", "ar", "nll")
    a, b = np.array(MDLM), np.array(AR)
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 3
    t = (a.mean() - b.mean()) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    assert test["difference"] == pytest.approx(a.mean() - b.mean())
    assert test["t"] == pytest.approx(t) and test["df"] == pytest.approx(df)
    assert test["p"] == pytest.approx(student_t_cdf(t, df)) and test["p"] > 0.95
    assert test["test"].startswith("one-sided Welch t-test on per-seed values of mdlm nelbo_mc "
                                   "(upper bound, bpb) vs ar nll (exact, bpb)")
    # the other way round, with mdlm as the baseline, ar is significantly lower
    (back,) = baseline_tests(entries, "mdlm")
    assert back["objective"] == "ar" and back["p"] == pytest.approx(1 - test["p"])
    assert baseline_tests(entries, "none") == []
    md = to_markdown(entries)
    assert "## Across seeds" in md and "## Against the baseline (ar)" in md
    assert f"p = {test['p']:.4g}" in md
    data = to_json(entries)
    assert data["baseline"]["tests"][0]["p"] == test["p"]
    assert data["budget"]["steps"] == 4 and data["budget"]["basis"].startswith("equal steps")


def test_no_p_below_two_seeds_or_across_configs():
    one_ar = [entry("ar", 1, [metric("nll", "exact", 2.1)])] + seeded()[3:]
    (test,) = baseline_tests(one_ar, "ar")
    assert test["p"] is None and "at least 2 seeds" in test["reason"]
    assert test["difference"] == pytest.approx(np.mean(MDLM) - 2.1)
    assert "p = null: needs at least 2 seeds" in test["test"]
    # two runs of ar that differ in their budget are not seeds of one run
    mixed = [entry("ar", 1, [metric("nll", "exact", 2.1)]),
             entry("ar", 2, [metric("nll", "exact", 2.0)], steps=8)] + seeded()[3:]
    (test,) = baseline_tests(mixed, "ar")
    assert test["p"] is None and "differ in more than the seed (train.steps" in test["reason"]
    assert to_json(mixed)["budget"] is None


def test_paired_rows_pair_only_runs_of_one_seed(monkeypatch):
    import lmkit.core.compare.report as compare_mod

    calls = []

    def fake(m, ua, other, ub):
        calls.append((ua, ub))
        return {"metric": m["name"], "difference": 0.0, "stderr": 0.1,
                "independent_stderr": 0.2}

    monkeypatch.setattr(compare_mod, "paired_difference", fake)
    entries = [entry(o, s, [metric("nelbo_mc", "upper_bound", 2.0, 0.01)])
               for o in ("mdlm", "maskrecon") for s in (1, 2)]
    for e in entries:
        e.units = {"nelbo_mc": f"{e.objective}{e.seed}"}
    rows = paired_rows(entries)
    assert sorted(calls) == [("mdlm1", "maskrecon1"), ("mdlm2", "maskrecon2")]
    assert {(r["seed"], r["a"], r["b"]) for r in rows} == {
        (1, "mdlm-s1", "maskrecon-s1"), (2, "mdlm-s2", "maskrecon-s2")}


def test_budget_basis_names_the_budget():
    assert budget_basis({"steps": 4, "tokens": None, "seconds": None}) == \
        "equal steps: 4 steps per run"
    assert budget_basis({"steps": None, "tokens": 1500000, "seconds": None}).startswith(
        "equal tokens: 1,500,000 tokens")
    assert "equal wall clock" in budget_basis({"steps": None, "tokens": None, "seconds": 60.0})
    assert "whichever came first" in budget_basis({"steps": 4, "tokens": 100, "seconds": None})


def seeds_args(data, out, *extra):
    return ["compare", "--objectives", "ar,mdlm", "--seeds", "1,2", "--preset", "tiny",
            "--steps", "4", "--max-tokens", "512", "--data", str(data), "--out", str(out),
            *FAST, *extra]


def test_compare_seeds_cli_mean_std_welch_and_reuse(tiny_data, tmp_path, capsys):
    out_dir = tmp_path / "s"
    code, out, err = run_cli(seeds_args(tiny_data, out_dir), capsys)
    assert code == 0, err
    assert "across seeds" in out and "mean ± std" in out and "mdlm" in out
    assert "(one-sided Welch t-test)" in out and "nelbo_mc (≤) vs ar" in out
    assert "equal steps: 4 steps per run" in out
    result = json.loads((out_dir / "compare.json").read_text())
    assert [(r["objective"], r["seed"]) for r in result["rows"]] == [
        ("ar", 1), ("ar", 2), ("mdlm", 1), ("mdlm", 2)]
    assert sorted(p.name for p in (out_dir / "runs").iterdir()) == [
        "ar-s1", "ar-s2", "mdlm-s1", "mdlm-s2"]
    (test,) = result["baseline"]["tests"]
    assert (test["objective"], test["baseline"], test["n"], test["baseline_n"]) == (
        "mdlm", "ar", 2, 2)
    assert test["p"] is not None and 0 <= test["p"] <= 1 and test["df"] > 0
    assert result["budget"] == {"steps": 4, "tokens": None, "seconds": None,
                                "basis": "equal steps: 4 steps per run"}
    assert {p["seed"] for p in result["paired"]} <= {1, 2}  # never across seeds
    md = (out_dir / "report.md").read_text()
    assert "one-sided Welch t-test on per-seed values of mdlm nelbo_mc" in md
    assert "* Budget: equal steps: 4 steps per run." in md

    # a finished comparison is never overwritten ...
    code, _, err = run_cli(seeds_args(tiny_data, out_dir), capsys)
    assert code == 1 and "already holds a comparison" in err
    # ... but an interrupted one (runs there, no compare.json) reuses its complete runs,
    # trains the missing ones and resumes the unfinished ones
    (out_dir / "compare.json").unlink()
    ckpt = sorted((out_dir / "runs" / "ar-s1").rglob("*.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in ckpt]
    shutil.rmtree(out_dir / "runs" / "ar-s2")
    partial = out_dir / "runs" / "mdlm-s2"
    shutil.rmtree(partial)
    code, _, err = run_cli(["train", "--objective", "mdlm", "--preset", "tiny", "--steps", "2",
                            "--seed", "2", "--data", str(tiny_data), "--out", str(partial),
                            "--quiet", *FAST], capsys)
    assert code == 0, err
    toml = partial / "config.toml"  # as if a 4-step run had been stopped after step 2
    toml.write_text(toml.read_text().replace("steps = 2\n", "steps = 4\n", 1))
    state_file = partial / "checkpoint" / "state.json"  # as if it had validated for 100 s
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "val_seconds": 100.0}))
    validated_before = read_run_state(partial)["val_seconds"]
    code, out, err = run_cli(seeds_args(tiny_data, out_dir, "--json"), capsys)
    assert code == 0, err
    # the cost counts this process's validations only: ar-s2's, and mdlm-s2's after the resume
    phases = json.loads(out)["cost"]["phases"]
    validated = (read_run_state(out_dir / "runs" / "ar-s2")["val_seconds"]
                 + read_run_state(partial)["val_seconds"] - validated_before)
    assert abs(phases["validation"] - validated) <= 0.1 and validated_before == 100.0
    again = {r["label"]: r for r in json.loads(out)["rows"]}
    first = {r["label"]: r for r in result["rows"]}
    for label in ("ar-s1", "ar-s2", "mdlm-s1"):  # reused, or retrained deterministically
        assert again[label]["metrics"] == first[label]["metrics"]
    assert [p.stat().st_mtime_ns for p in ckpt] == mtimes  # ar-s1 was not retrained
    assert again["mdlm-s2"]["tokens"] == 4 * 256  # resumed to the full budget
    assert read_run_state(partial)["step"] == 4
    # a run of another config in the way is an error, not silently mixed in
    (out_dir / "compare.json").unlink()
    code, _, err = run_cli(seeds_args(tiny_data, out_dir, "--set", "model.n_layer=1"), capsys)
    assert code == 1 and "another config" in err


def test_seeds_option_errors(tiny_data, tmp_path, capsys):
    code, _, err = run_cli(seeds_args(tiny_data, tmp_path / "a", "--seed", "3"), capsys)
    assert code == 1 and "--seeds and --seed conflict" in err
    code, _, err = run_cli(["compare", "--objectives", "ar", "--seeds", "1,1"], capsys)
    assert code == 1 and "distinct integers" in err
    code, _, err = run_cli(["compare", "--objectives", "ar", "--seeds", "1,x"], capsys)
    assert code == 1 and "comma-separated integers" in err
    code, _, err = run_cli(seeds_args(tiny_data, tmp_path / "b", "--baseline", "mtp"), capsys)
    assert code == 1 and "--baseline mtp is not one of --objectives" in err
    code, _, err = run_cli(["compare", str(tmp_path), "--seeds", "1,2"], capsys)
    assert code == 1 and "RUN_DIRs keep their own seeds" in err
