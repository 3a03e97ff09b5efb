"""`lmkit compare`: one honest table across objectives."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from lmkit.cli import main
from lmkit.core import registry as registry_mod
from lmkit.core.compare import cost_line
from lmkit.core.memory import peak_rss_bytes
from lmkit.core.registry import Registry
from lmkit.core.runs import read_metrics
from tests.test_registry import make_objective, plugin_module

FAST = ["--set", "train.seq_len=32", "--set",
        "train.batch_tokens=256", "--set", "train.val_tokens=512", "--set", "train.dtype=fp32"]


def run_cli(args, capsys):
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def compare_args(data, out, objectives="ar,mdlm,maskrecon", *extra):
    return ["compare", "--objectives", objectives, "--preset", "tiny", "--steps", "6",
            "--data", str(data), "--out", str(out), "--max-tokens", "1024", *FAST, *extra]


def test_compare_json_md_png_and_determinism(tiny_data, tmp_path, capsys):
    t0 = time.perf_counter()
    code, out, err = run_cli(compare_args(tiny_data, tmp_path / "a", "ar,mdlm,maskrecon",
                                          "--json"), capsys)
    elapsed = time.perf_counter() - t0
    assert code == 0, err
    result = json.loads(out)
    # what it cost: its own wall clock (within the call's) and this process's peak memory
    cost = result["cost"]
    assert 0 < cost["wall_seconds"] <= elapsed + 0.1
    assert 50e6 < cost["peak_rss_bytes"] <= peak_rss_bytes()
    assert json.loads((tmp_path / "a" / "compare.json").read_text())["cost"] == cost
    assert cost_line(cost) in (tmp_path / "a" / "report.md").read_text()
    # where it went: the phases add up to the wall clock; validation is part of training and is
    # each run's own record of it
    rows = {r["objective"]: r for r in result["rows"]}
    phases = cost["phases"]
    assert abs(phases["training"] + phases["evaluation"] + phases["other"]
               - cost["wall_seconds"]) <= 0.2
    assert 0 < phases["validation"] < phases["training"] and phases["evaluation"] > 0
    recorded = sum(next(m for m in reversed(read_metrics(r["run"])) if m["type"] == "val")
                   ["val_seconds"] for r in result["rows"])
    assert abs(phases["validation"] - recorded) <= 0.1
    assert "training " in cost_line(cost) and "of which validation" in cost_line(cost)
    assert list(rows) == ["ar", "mdlm", "maskrecon"]
    kinds = {r["objective"]: {m["name"]: m["kind"] for m in r["metrics"]} for r in result["rows"]}
    assert kinds["ar"] == {"nll": "exact"}
    assert kinds["mdlm"]["nelbo_mc"] == "upper_bound" and kinds["mdlm"]["chain_rule"] == "exact"
    assert kinds["maskrecon"]["recon_score"] == "score"
    for r in result["rows"]:
        assert r["tokens"] == 6 * 256 and r["params"] > 0
        for m in r["metrics"]:  # every objective scored the same tokens with the same bytes
            assert (m["tokens"], m["bytes"]) == (rows["ar"]["metrics"][0]["tokens"],
                                                 rows["ar"]["metrics"][0]["bytes"])
    png = tmp_path / "a" / "val_bpb.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["files"]["png"] == str(png)
    for r in result["rows"]:  # a curve: several validations per run
        assert len([m for m in read_metrics(r["run"]) if m["type"] == "val"]) >= 3
    md = (tmp_path / "a" / "report.md").read_text()
    assert "| ar |" in md and "≤" in md and "score " in md and "val_bpb.png" in md

    # the same command again gives the same numbers
    code, out, err = run_cli(compare_args(tiny_data, tmp_path / "b", "ar,mdlm,maskrecon",
                                          "--json"), capsys)
    again = json.loads(out)
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in result["rows"]]

    # existing runs: --md table
    runs = [r["run"] for r in result["rows"]]
    code, out, err = run_cli(["compare", *runs, "--md", "--out", str(tmp_path / "c"),
                              "--max-tokens", "1024"], capsys)
    assert code == 0, err
    table = out.split("\n\n")[1].splitlines()
    assert out.startswith("# lmkit compare") and len(table) == 5  # header, rule, 3 rows
    loaded = json.loads((tmp_path / "c" / "compare.json").read_text())["cost"]
    assert loaded["phases"]["training"] == 0 and loaded["phases"]["validation"] == 0
    # all of it is evaluation and the rest (on a fast CPU these three tiny scorings round to 0.0)
    assert abs(loaded["phases"]["evaluation"] + loaded["phases"]["other"]
               - loaded["wall_seconds"]) <= 0.15
    assert loaded["phases"]["evaluation"] >= 0 and "of which" not in cost_line(loaded)
    assert "## Paired differences" in out  # mdlm and maskrecon were scored with the same masks


def test_compare_refuses_runs_on_different_data(tiny_data, tmp_path, capsys):
    code, out, err = run_cli(compare_args(tiny_data, tmp_path / "a", "ar", "--json"), capsys)
    run = json.loads(out)["rows"][0]["run"]
    other = tmp_path / "other"
    shutil.copytree(run, other)
    meta = json.loads((other / "run.json").read_text())
    meta["data"]["tokenizer"]["sha256"] = "0" * 64
    (other / "run.json").write_text(json.dumps(meta))
    code, _, err = run_cli(["compare", run, str(other), "--out", str(tmp_path / "c")], capsys)
    assert code == 1 and "not comparable" in err and "--force" in err


def test_compare_needs_runs_or_objectives(capsys):
    code, _, err = run_cli(["compare"], capsys)
    assert code == 1 and "either RUN_DIRs" in err
    code, _, err = run_cli(["compare", "--objectives", "ar,nope", "--preset", "tiny"], capsys)
    assert code == 1 and "unknown objective 'nope'" in err


@pytest.fixture
def third_party():
    reg = Registry()
    reg.load(entry_points=False)
    reg.add_plugin(plugin_module("theirs", make_objective("theirs")), "theirs", "lmkit-theirs",
                   "0.3")
    registry_mod.reset_registry(reg)
    yield
    registry_mod.reset_registry(None)


def test_a_third_party_objective_can_be_compared(tiny_data, tmp_path, capsys, third_party):
    code, out, err = run_cli(compare_args(tiny_data, tmp_path / "a", "ar,theirs", "--json"),
                             capsys)
    assert code == 0, err
    assert [r["objective"] for r in json.loads(out)["rows"]] == ["ar", "theirs"]


@pytest.mark.slow  # seconds; the default run keeps its cheaper siblings
def test_compare_with_pack_and_gen(tiny_data, tmp_path, capsys):
    code, out, err = run_cli(compare_args(tiny_data, tmp_path / "a", "ar,mdlm", "--pack",
                                          "--gen", "--json"), capsys)
    assert code == 0, err
    for row in json.loads(out)["rows"]:
        kinds = {m["name"]: m["kind"] for m in row["metrics"]}
        assert kinds["gen_ppl"] == kinds["gen_entropy"] == "score"
        assert int(row["artifact bytes"].replace(",", "")) == row["pack"]["artifact_bytes"]
        assert row["pack"]["artifact_bytes"] <= 16_000_000


def test_sanity_rules_flag_impossible_rows_everywhere():
    from lmkit.core.compare import Entry, sanity_check, to_json, to_markdown

    def metric(name, kind, value, stderr=None, tokens=1000):
        return {"name": name, "kind": kind, "value": value, "unit": "bpb", "stderr": stderr,
                "tokens": tokens, "bytes": 2400, "detail": {}}

    ar = Entry("ar", Path("a"), 1000, 10, 1.0, [metric("nll", "exact", 1.8)], {})
    beats = Entry("mdlm", Path("m"), 1200, 10, 1.0,
                  [metric("nelbo_mc", "upper_bound", 1.6, 0.01),
                   metric("chain_rule", "exact", 2.1)], {})
    fine = Entry("maskrecon", Path("r"), 1100, 10, 1.0,
                 [metric("nelbo_mc", "upper_bound", 2.2, 0.01),
                  metric("chain_rule", "exact", 2.19),
                  metric("recon_score", "score", 0.5, 0.01)], {})
    other_tokens = Entry("mdlm", Path("o"), 1000, 10, 1.0,
                         [metric("nelbo_mc", "upper_bound", 1.0, 0.01, tokens=999)], {})
    sanity_check([ar, beats, fine, other_tokens])
    assert ar.warnings == [] and fine.warnings == [] and other_tokens.warnings == []
    assert len(beats.warnings) == 2
    assert "beats ar's exact nll" in beats.warnings[0]
    assert "below this run's exact code length chain_rule" in beats.warnings[1]
    assert to_json([ar, beats])["rows"][1]["warnings"] == beats.warnings
    assert "## Warnings" in to_markdown([ar, beats]) and "## Warnings" not in to_markdown([ar])


def test_free_information_is_marked_in_every_table():
    from lmkit.core.compare import Entry, to_markdown
    from lmkit.core.kinds import format_metric

    given = {"name": "nelbo_mc", "kind": "upper_bound", "value": 2.0, "unit": "bpb",
             "stderr": 0.01, "tokens": 10, "bytes": 20,
             "detail": {"free_information": ["bos_anchor"]}}
    plain = {**given, "detail": {"free_information": []}}
    assert format_metric(given).endswith("†") and "†" not in format_metric(plain)
    md = to_markdown([Entry("mdlm", Path("m"), 1, 1, 1.0, [given], {})])
    assert "≤2.0000 ± 0.0100†" in md and "† given free information" in md
    assert "†" not in to_markdown([Entry("mdlm", Path("m"), 1, 1, 1.0, [plain], {})])
