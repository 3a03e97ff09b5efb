"""What a newcomer reads: progress lines, table notes, messages that point at the real problem."""

from __future__ import annotations

import re

import pytest

from lmkit.cli.display import budget_text, fmt_mfu, fmt_seconds, train_line
from lmkit.core.kinds import CODES_NOTE, format_metric, legend
from tests.test_compare import run_cli


def record(progress: float, eta_s: float | None, mfu: float | None) -> dict:
    return {"step": 10, "loss": 3.21, "lr_mult": 1.0, "tok_s": 5000.0, "mfu": mfu,
            "tokens": 1e5, "eta_s": eta_s, "progress": progress, "loss_metrics": {}}


@pytest.mark.parametrize("progress, eta_s, mfu", [
    (0.0, None, None),        # first step: no ETA yet
    (0.5, 61.0, 0.12),        # mid-run
    (1.02, -12.0, 3.238),     # past the budget, with a peak measured under other conditions
])
def test_the_progress_line_never_shows_a_negative_eta_or_an_mfu_above_100(progress, eta_s, mfu):
    line = train_line(record(progress, eta_s, mfu))
    eta = line.split("eta ")[1]
    assert not eta.startswith("-") or eta == "-"
    assert re.fullmatch(r"-|\d+:\d\d(:\d\d)?", eta)
    shown = line.split("mfu ")[1].split(" ")[0]
    assert shown == "-" or 0 <= float(shown.rstrip("%")) <= 100


def test_durations_and_mfu_format_honestly():
    assert fmt_seconds(-12) == "0:00"  # was "-1:48"
    assert fmt_seconds(61) == "1:01" and fmt_seconds(3725) == "1:02:05"
    assert fmt_seconds(float("nan")) == "-" and fmt_seconds(None) == "-"
    assert fmt_mfu(0.253) == "25.3%" and fmt_mfu(4.096) == "-" and fmt_mfu(None) == "-"


def test_budget_states_which_budget_ends_training():
    assert budget_text({"steps": 300, "tokens": 0, "seconds": 0}) == "budget: 300 steps"
    both = budget_text({"steps": 300, "tokens": 1_500_000, "seconds": 0})
    assert both == "budget: 300 steps or 1.5M tokens, whichever comes first"


def test_tables_explain_exact_versus_bound_and_scores_carry_no_bpb():
    exact = {"name": "chain_rule", "kind": "exact", "value": 2.77, "stderr": None,
             "unit": "bpb", "detail": {}}
    bound = {"name": "nelbo_mc", "kind": "upper_bound", "value": 2.47, "stderr": 0.01,
             "unit": "bpb", "detail": {}}
    score = {"name": "recon_score", "kind": "score", "value": 9.6, "stderr": 0.03,
             "unit": "score", "detail": {}}
    assert CODES_NOTE in legend([exact, bound]) and CODES_NOTE not in legend([exact])
    assert format_metric(score, unit=True) == "score 9.6000 ± 0.0300"
    assert format_metric(bound, unit=True).endswith(" bpb")


def test_a_score_metric_has_unit_score():
    import torch

    from lmkit.core.bpb import BpbMeter, ByteLUT

    lut = ByteLUT(torch.full((8,), 2), torch.zeros(8, dtype=torch.bool),
                  torch.zeros(8, dtype=torch.bool))
    meter = BpbMeter(lut, "s", "score")
    meter.add_estimate(torch.tensor([3.0]), torch.tensor([0.1]), torch.tensor([4]),
                       torch.tensor([2]))
    assert meter.metric().unit == "score"


def test_data_messages_name_the_real_problem(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_cli(["train", "--data", str(empty), "--steps", "1"], capsys)
    assert code == 1 and "no train shards" in err and "--tokenizer" not in err
    a_file = tmp_path / "shards.bin"
    a_file.write_bytes(b"x")
    code, out, err = run_cli(["train", "--data", str(a_file), "--steps", "1"], capsys)
    assert code == 1 and "is a file" in err and "does not exist" not in err


def test_an_existing_artifact_is_not_called_missing(tmp_path, capsys):
    art = tmp_path / "model.int6.lzma"
    art.write_bytes(b"not an artifact")
    code, out, err = run_cli(["sample", str(art)], capsys)
    assert code == 1 and "does not exist" not in err and "artifact" in err


def test_the_cache_honours_xdg_cache_home(monkeypatch, tmp_path):
    from lmkit.core.data.pipeline import default_data_dir

    monkeypatch.delenv("LMKIT_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir("sotu", 1024) == tmp_path / "xdg" / "lmkit" / "data" / "sotu-sp1024"
    monkeypatch.setenv("LMKIT_HOME", str(tmp_path / "home"))
    assert default_data_dir("sotu", 1024) == tmp_path / "home" / "data" / "sotu-sp1024"


def test_trusted_mfu_is_absent_rather_than_above_100_percent():
    from lmkit.core.train import trusted_mfu

    assert trusted_mfu(2e9, 8e9) == 0.25
    assert trusted_mfu(3.2e10, 1e10) is None and trusted_mfu(1e9, None) is None


def test_training_records_and_the_bar_stay_honest_to_the_end(tiny_data, tmp_path):
    """Every logged record of a real run, first to last: ETA ≥ 0, MFU ≤ 100 % or absent, and
    the bar is told the progress at every step."""
    from lmkit.core.config import resolve_config
    from lmkit.core.data import open_data
    from lmkit.core.train import NullObserver, train

    class Recorder(NullObserver):
        def __init__(self):
            self.records, self.steps = [], []

        def on_log(self, record):
            self.records.append(record)

        def on_step(self, step, progress):
            self.steps.append((step, progress))

    cfg = resolve_config(preset="tiny", flags={"train.steps": 5, "data.path": str(tiny_data)},
                         sets=["train.seq_len=32", "train.batch_tokens=256",
                               "train.val_tokens=512", "train.dtype=fp32", "train.log_every=2"])
    seen = Recorder()
    train(cfg, open_data(tiny_data), tmp_path / "run", observer=seen)
    assert [s for s, _ in seen.steps] == [1, 2, 3, 4, 5] and seen.steps[-1][1] == 1.0
    assert [r["step"] for r in seen.records] == [1, 2, 4, 5]
    for r in seen.records:
        assert r["eta_s"] is None or r["eta_s"] >= 0
        assert r["mfu"] is None or 0 <= r["mfu"] <= 1
        assert 0 <= r["progress"] <= 1
        line = train_line(r)
        assert "eta -" in line or re.search(r"eta \d+:\d\d", line)
