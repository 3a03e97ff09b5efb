"""Context protocols as data: every metric states one, and `lmkit compare` never mixes them."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

from lmkit.core.bpb import Metric
from lmkit.core.compare import (
    Entry,
    baseline_tests,
    eval_options_for,
    sanity_check,
    to_csv,
    to_json,
    to_markdown,
)
from lmkit.core.contexts import UNSTATED, protocol_note, protocol_of, sliding
from lmkit.core.evaluate import run_evaluation
from lmkit.errors import LmkitError
from tests.test_compare import FAST, run_cli

CONFIG = {"train": {"seed": 0, "steps": 4, "tokens": 0, "time": 0.0}}


def metric(name, kind, value, protocol=None, stderr=None, tokens=512, **detail):
    if protocol is not None:
        detail["protocol"] = protocol
    return {"name": name, "kind": kind, "value": value, "unit": "score" if kind == "score"
            else "bpb", "stderr": stderr, "tokens": tokens, "bytes": 1200, "detail": detail}


def entry(objective, metrics, seed=None, name=None):
    config = {**CONFIG, "train": {**CONFIG["train"], "seed": seed}}
    return Entry(objective, Path(f"/r/{name or objective}"), 1000, 1024, 2.0, metrics, {},
                 seed=seed, config=config)


def test_vocabulary_and_unstated():
    assert sliding(64) == "sliding(64)" and "stride 64" in protocol_note("sliding(64)")
    assert protocol_of({"detail": {}}) == protocol_of({"detail": {"protocol": 3}}) == UNSTATED
    assert "not one of lmkit's" in protocol_note("retrieval_augmented")

    class Silent:  # a third-party objective that states no protocol
        name = "silent"

        def evaluate(self, model, ctx):
            return [Metric("x", "exact", 1.0, "bpb", None, 1, 1, {"estimator": "mine"}),
                    Metric("y", "exact", 1.0, "bpb", None, 1, 1, {"protocol": "sliding(8)"})]

    out = run_evaluation(torch.nn.Linear(1, 1), Silent(), None)
    assert out[0].detail == {"estimator": "mine", "protocol": "unstated"}
    assert out[1].detail["protocol"] == "sliding(8)"  # a stated protocol is kept


def test_a_name_under_two_protocols_gets_two_columns_everywhere():
    entries = [entry("ar", [metric("nll", "exact", 2.0, "non_overlapping")]),
               entry("mdlm", [metric("nelbo_mc", "upper_bound", 2.3, "document_isolated",
                                     0.01)], name="mdlm-doc"),
               entry("mdlm", [metric("nelbo_mc", "upper_bound", 2.4, "non_overlapping", 0.01)],
                     name="mdlm-win"),
               entry("maskrecon", [metric("nelbo_mc", "upper_bound", 2.5, None, 0.01)])]
    md = to_markdown(entries)
    header = md.splitlines()[2]
    for col in ("nll (bpb; non_overlapping)", "nelbo_mc (bpb; document_isolated)",
                "nelbo_mc (bpb; non_overlapping)", "nelbo_mc (bpb; unstated)"):
        assert col in header
    cells = [line.split(" | ") for line in md.splitlines()[4:8]]
    heads = header.split(" | ")
    doc, win = heads.index("nelbo_mc (bpb; document_isolated)"), \
        heads.index("nelbo_mc (bpb; non_overlapping)")
    assert cells[1][doc] == "≤2.3000 ± 0.0100" and cells[1][win] == ""
    assert cells[2][win] == "≤2.4000 ± 0.0100" and cells[2][doc] == ""
    assert "`nelbo_mc` was scored under different context protocols" in md
    assert "`unstated`: the objective did not state" in md
    data = json.loads(json.dumps(to_json(entries)))
    keys = [c["key"] for c in data["columns"]]
    assert keys == ["nll", "nelbo_mc[document_isolated]", "nelbo_mc[non_overlapping]",
                    "nelbo_mc[unstated]"]
    assert data["protocol_conflicts"] == [{"metric": "nelbo_mc", "protocols": {
        "document_isolated": ["mdlm (mdlm-doc)"], "non_overlapping": ["mdlm (mdlm-win)"],
        "unstated": ["maskrecon"]}}]
    assert set(data["protocols"]) == {"non_overlapping", "document_isolated", "unstated"}
    rows = list(csv.DictReader(io.StringIO(to_csv(entries))))
    assert rows[1]["nelbo_mc[document_isolated]_value"] == "2.3"
    assert rows[1]["nelbo_mc[non_overlapping]_value"] == ""
    assert rows[0]["nll_protocol"] == "non_overlapping"


def test_baseline_test_uses_the_baseline_metric_of_the_same_protocol():
    def runs(with_doc):
        ar = [entry("ar", [metric("nll", "exact", 2.0 + s / 100, "non_overlapping")]
                    + ([metric("nll_doc", "exact", 1.9 + s / 100, "document_isolated")]
                       if with_doc else []), seed=s, name=f"ar{s}") for s in (1, 2, 3)]
        mdlm = [entry("mdlm", [metric("nelbo_mc", "upper_bound", 2.2 + s / 50,
                                      "document_isolated", 0.01)], seed=s, name=f"m{s}")
                for s in (1, 2, 3)]
        return ar + mdlm

    (same,) = baseline_tests(runs(True), "ar")
    assert same["baseline_metric"] == "nll_doc" and same["same_protocol"]
    assert "protocols differ" not in same["test"]
    (other,) = baseline_tests(runs(False), "ar")
    assert other["baseline_metric"] == "nll" and not other["same_protocol"]
    assert "context protocols differ (document_isolated vs non_overlapping)" in other["test"]
    assert "context protocols differ" in to_markdown(runs(False), baseline="ar")


def test_sanity_warning_names_a_protocol_difference():
    ar = entry("ar", [metric("nll", "exact", 2.0, "non_overlapping")])
    mdlm = entry("mdlm", [metric("nelbo_mc", "upper_bound", 1.5, "document_isolated", 0.01)])
    sanity_check([ar, mdlm])
    assert "context protocols differ: nelbo_mc document_isolated vs nll non_overlapping" \
        in mdlm.warnings[0]


def test_report_shows_what_the_seeds_would_have_printed_beside_the_bound():
    bound = metric("nelbo_T128", "upper_bound", 1.8, "non_overlapping", 0.02)
    fig = metric("pr1241_val_var_bpb", "score", 1.02, "non_overlapping", 0.011,
                 figure_of="PR #1241", reported_as="val_var_bpb", beside="nelbo_T128",
                 note="a score, not a bpb: 4.3 bytes per token")
    entries = [entry("mdlm", [bound, fig])]
    md = to_markdown(entries)
    assert "## What the seeds would have printed" in md
    row = next(line for line in md.splitlines() if line.startswith("| mdlm | pr1241"))
    assert 'PR #1241 "val_var_bpb"' in row and "score 1.0200" in row
    assert "nelbo_T128 ≤1.8000 ± 0.0200 bpb" in row and "4.3 bytes per token" in row
    (r,) = json.loads(json.dumps(to_json(entries)))["seed_figures"]
    assert r["honest"]["value"] == 1.8 and r["value"] == 1.02


def test_compare_options_go_to_the_objectives_that_declare_them():
    assert eval_options_for(["ar", "mdlm", "maskrecon"], {"seed_figures": "true"}) == {
        "ar": {}, "mdlm": {"seed_figures": "true"}, "maskrecon": {"seed_figures": "true"}}
    assert eval_options_for(["ar", "mtp"], {"doc_isolated": "1"}) == {
        "ar": {"doc_isolated": "1"}, "mtp": {"doc_isolated": "1"}}
    with pytest.raises(LmkitError, match="--opt seed_figure: no objective"):
        eval_options_for(["ar"], {"seed_figure": "true"})


@pytest.mark.slow
def test_compare_cli_with_seed_figures_and_doc_isolated(tiny_data, tmp_path, capsys):
    out = tmp_path / "c"
    code, _, err = run_cli(["compare", "--objectives", "ar,mdlm", "--preset", "tiny", "--steps",
                            "3", "--max-tokens", "512", "--data", str(tiny_data), "--out",
                            str(out), "--opt", "seed_figures=true", "--opt",
                            "doc_isolated=true", "--opt", "samples=2", *FAST, "--md"], capsys)
    assert code == 0, err
    md = (out / "report.md").read_text()
    assert "nll_doc (bpb; document_isolated)" in md and "pr1241_val_var_bpb" in md
    assert "## What the seeds would have printed" in md and "nelbo_T128 ≤" in md
