"""Loggers: metric sinks fed from the one logging path (metrics.jsonl), built-in or third-party.

trackio and TensorBoard are tested for real (installed by the test extra): a tiny run logs to
both, and the loss curve is read back through each library's own reader and matched to
metrics.jsonl step for step. wandb is not installed by the test extra; its missing-extra error
is tested with the import blocked, and its offline settings as the arguments it would get.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import types
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from lmkit import hookimpl
from lmkit.builtin.loggers import refuse_remote, scalars, wandb_run_id, wandb_settings
from lmkit.core import registry as registry_mod
from lmkit.core.config import resolve_config, to_toml
from lmkit.core.loggers import LoggerWarning
from lmkit.core.registry import Registry
from lmkit.core.runs import read_metrics
from lmkit.errors import LmkitError
from lmkit.protocols import LoggerContext
from tests.test_cli import FAST, assert_one_clear_error, run_cli

TINY = ["--objective", "ar", "--preset", "tiny", "--steps", "3", "--set", "train.log_every=1",
        "--quiet", *FAST]


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *TINY, "--data", str(data), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trackio_dir(tmp_path_factory) -> Path:
    """trackio reads TRACKIO_DIR once, when it is first imported: point it here before that."""
    where = tmp_path_factory.mktemp("trackio")
    if "trackio" in sys.modules:
        pytest.fail("trackio was imported before this module set TRACKIO_DIR")
    previous = os.environ.get("TRACKIO_DIR")
    os.environ["TRACKIO_DIR"] = str(where)
    yield where
    if previous is None:
        os.environ.pop("TRACKIO_DIR", None)
    else:
        os.environ["TRACKIO_DIR"] = previous


def curve(records: list[dict], kind: str, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if r["type"] == kind and r.get(key) is not None]


def test_trackio_and_tensorboard_read_back_the_jsonl_curve(tiny_data, tmp_path, trackio_dir,
                                                           capsys, monkeypatch):
    pytest.importorskip("trackio", reason="the test extra installs trackio")
    pytest.importorskip("tensorboard", reason="the test extra installs tensorboard")
    dialed: list = []  # neither library may reach the network
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family != socket.AF_UNIX:
            dialed.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    run = tmp_path / "run"
    code, out, err = run_cli(train_args(tiny_data, run, "--log", "trackio,tensorboard",
                                        "--json"), capsys)
    assert code == 0, err
    assert json.loads(out)["steps"] == 3  # trackio's own messages went to stderr, not --json
    assert not dialed, dialed
    records = read_metrics(run)
    loss = curve(records, "train", "loss")
    assert [s for s, _ in loss] == [1, 2, 3]
    val = [(r["step"], m["value"]) for r in records if r["type"] == "val"
           for m in r["metrics"] if m["name"] == "nll"]
    assert len(val) == 1

    # TensorBoard: its own event reader; scalars are stored as float32
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    for tag, expected in (("train/loss", loss), ("val/nll", val)):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [v for _, v in got] == [float(np.float32(v)) for _, v in expected]

    # trackio: its own storage API on the local SQLite it wrote under TRACKIO_DIR
    from trackio import Api
    from trackio.sqlite_storage import SQLiteStorage
    from trackio.utils import TRACKIO_DIR

    assert Path(TRACKIO_DIR) == trackio_dir and (trackio_dir / "lmkit.db").is_file()
    assert [r.name for r in Api().runs("lmkit")] == [str(run)]
    for tag, expected in (("train/loss", loss), ("val/nll", val)):
        got = SQLiteStorage.get_metric_values("lmkit", str(run), tag)
        assert [(g["step"], g["value"]) for g in got] == expected
    config = SQLiteStorage.get_run_config("lmkit", str(run))
    assert config["train"]["log"] == ["trackio", "tensorboard"]
    assert config["model"] == json.loads((run / "run.json").read_text())["config"]["model"]


def test_on_resume_tensorboard_replaces_the_steps_past_the_checkpoint_trackio_keeps_both(
        tmp_path, trackio_dir):
    pytest.importorskip("trackio", reason="the test extra installs trackio")
    pytest.importorskip("tensorboard", reason="the test extra installs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trackio.sqlite_storage import SQLiteStorage

    from lmkit.builtin.loggers import TensorBoardLogger, TrackioLogger

    run = tmp_path / "run"
    run.mkdir()
    for cls in (TensorBoardLogger, TrackioLogger):
        first = cls(LoggerContext(run, {"objective": "ar"}))
        for step in (1, 2, 3, 4):
            first.log({"type": "train", "step": step, "loss": float(step)})
        first.close()
        again = cls(LoggerContext(run, {"objective": "ar"}, resumed_at=2))
        for step in (3, 4):
            again.log({"type": "train", "step": step, "loss": 10.0 + step})
        again.close()
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    got = SQLiteStorage.get_metric_values("lmkit", str(run), "train/loss")
    assert [(g["step"], g["value"]) for g in got] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (3, 13.0), (4, 14.0)]


class Recorder:
    """A third-party sink that keeps what it is given."""

    name = "recorder"
    description = "keeps every record in memory (test)"
    opened: list[LoggerContext] = []
    seen: list[dict] = []
    closed = 0

    def __init__(self, ctx: LoggerContext) -> None:
        Recorder.opened.append(ctx)

    def log(self, record: dict) -> None:
        Recorder.seen.append(copy.deepcopy(record))
        record["step"] = -1  # its own copy: the next sink's record is unchanged

    def close(self) -> None:
        Recorder.closed += 1


class Flaky(Recorder):
    """A sink that breaks on its second record."""

    name = "flaky"
    description = "fails mid-run (test)"
    steps: list[int] = []

    def __init__(self, ctx: LoggerContext) -> None:
        pass

    def log(self, record: dict) -> None:
        Flaky.steps.append(record["step"])
        if len(Flaky.steps) == 2:
            raise ConnectionError("tracker went away")

    def close(self) -> None:
        Flaky.closed += 1


@pytest.fixture
def sink_plugin():
    """A registry holding the built-ins and a plugin registering Recorder and Flaky, as its
    entry point would; the process registry is restored (the plugin gone) afterwards."""
    plugin = types.ModuleType("lmkit_sinks")

    @hookimpl
    def register_loggers(register):
        register(Recorder)
        register(Flaky)

    plugin.register_loggers = register_loggers
    reg = Registry()
    reg.load(entry_points=False)
    reg.add_plugin(plugin, "sinks", "lmkit-sinks", "0.1")
    registry_mod.reset_registry(reg)
    Recorder.opened, Recorder.seen, Recorder.closed = [], [], 0
    Flaky.steps, Flaky.closed = [], 0
    yield reg
    registry_mod.reset_registry(None)
    assert "recorder" not in registry_mod.get_registry().entries["logger"]


def test_a_plugin_sink_sees_every_record_and_a_failing_one_is_dropped(sink_plugin, tiny_data,
                                                                      tmp_path, capsys):
    code, out, _ = run_cli(["loggers", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["recorder"]["distribution"] == "lmkit-sinks"
    assert {"trackio", "tensorboard", "wandb"} <= set(rows)
    code, out, _ = run_cli(["loggers"], capsys)
    assert "recorder" in out and "pip install 'lmkit[tensorboard]'" in " ".join(out.split())
    code, out, _ = run_cli(["plugins", "--json"], capsys)
    assert [p["hooks"] for p in json.loads(out) if p["name"] == "sinks"] == [["register_loggers"]]

    run = tmp_path / "run"
    with pytest.warns(LoggerWarning) as caught:
        code, _, err = run_cli(train_args(tiny_data, run, "--set", "train.log=recorder,flaky"),
                               capsys)
    assert code == 0, err
    assert len(caught) == 1 and "'flaky'" in str(caught[0].message)
    assert "ConnectionError: tracker went away" in str(caught[0].message)
    assert "\n" not in str(caught[0].message)
    records = read_metrics(run)
    assert Recorder.seen == records  # every record, equal to the JSONL, unchanged by the sink
    assert [r["type"] for r in records] == ["train", "train", "train", "val"]
    assert Flaky.steps == [1, 2] and Flaky.closed == 1 and Recorder.closed == 1
    (ctx,) = Recorder.opened
    assert ctx.run_dir == run and ctx.resumed_at is None
    assert ctx.config == json.loads((run / "run.json").read_text())["config"]


@pytest.mark.slow
def test_a_resumed_run_reopens_its_sinks_at_the_checkpoint(sink_plugin, tiny_data, tmp_path,
                                                          capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(train_args(tiny_data, run, "--log", "recorder"), capsys)
    assert code == 0, err
    before = len(Recorder.seen)
    assert Recorder.seen == read_metrics(run)
    # a larger budget: opened again at the checkpoint's step, fed only the new records
    code, _, err = run_cli(["train", "--resume", str(run), "--steps", "4", "--quiet"], capsys)
    assert code == 0, err
    assert [c.resumed_at for c in Recorder.opened] == [None, 3]
    assert Recorder.seen[before:] == read_metrics(run)[before:]
    assert [(r["type"], r["step"]) for r in Recorder.seen[before:]] == [("train", 4), ("val", 4)]


def test_unknown_logger_is_one_error_listing_the_registered(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(train_args(tiny_data, run, "--log", "tensorbored"), capsys)
    assert_one_clear_error(code, err, "unknown logger 'tensorbored'", "tensorboard, trackio, "
                           "wandb")
    assert not run.exists()  # refused before any work


def test_missing_library_fails_before_training_naming_the_extra(tiny_data, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import raises
    run = tmp_path / "run"
    code, _, err = run_cli(train_args(tiny_data, run, "--log", "wandb"), capsys)
    assert_one_clear_error(code, err, "--log wandb needs wandb", "pip install 'lmkit[wandb]'")
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoint").exists()


def test_wandb_is_offline_unless_the_user_says_otherwise(tmp_path):
    ctx = LoggerContext(run_dir=tmp_path / "run", config={"objective": "ar"})
    args = wandb_settings(ctx, {}, "abc123")
    assert args["mode"] == "offline" and args["dir"] == str(tmp_path / "run")
    assert args["config"] == {"objective": "ar"} and args["resume"] is None
    assert args["id"] == "abc123" and args["project"] == "lmkit"
    assert wandb_settings(ctx, {"WANDB_MODE": "online"}, "abc123")["mode"] == "online"
    resumed = LoggerContext(tmp_path / "run", {}, resumed_at=5)
    assert wandb_settings(resumed, {}, "abc123")["resume"] == "allow"


def test_wandb_run_id_is_new_per_run_and_kept_on_resume(tmp_path):
    first = wandb_run_id(LoggerContext(tmp_path / "run", {}))
    assert (tmp_path / "run" / "wandb" / "lmkit-run-id").read_text().strip() == first
    assert wandb_run_id(LoggerContext(tmp_path / "run", {}, resumed_at=3)) == first
    again = wandb_run_id(LoggerContext(tmp_path / "run", {}))  # trained afresh: a new run
    assert again != first and len(again) == 16


def test_trackio_refuses_remote_settings():
    refuse_remote({"TRACKIO_DIR": "/tmp/x"})
    with pytest.raises(LmkitError, match="TRACKIO_SPACE_ID"):
        refuse_remote({"TRACKIO_SPACE_ID": "me/space"})


def test_scalars_flatten_a_record():
    train = {"type": "train", "step": 5, "tokens": 40, "loss": 2.5, "mfu": None, "flag": True,
             "loss_metrics": {"mask_rate": 0.5, "loss": 9.0}}
    assert scalars(train) == {"train/tokens": 40.0, "train/loss": 2.5,
                              "train/mask_rate": 0.5, "train/loss_metrics/loss": 9.0}
    val = {"type": "val", "step": 5, "metrics": [
        {"name": "nelbo", "value": 1.25, "stderr": 0.01}, {"name": "bad", "value": None}]}
    assert scalars(val) == {"val/nelbo": 1.25, "val/nelbo_stderr": 0.01}


def test_train_log_config_key_round_trips(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\n[train]\nlog = ["tensorboard", "trackio"]\n')
    cfg = resolve_config(config_file=toml)
    assert cfg.train.log == ["tensorboard", "trackio"]
    assert resolve_config(config_file=toml, sets=["train.log=wandb"]).train.log == ["wandb"]
    assert resolve_config(preset="tiny").train.log == []
    (tmp_path / "again.toml").write_text(to_toml(cfg))
    assert resolve_config(config_file=tmp_path / "again.toml").train.log == cfg.train.log
    toml.write_text('preset = "tiny"\n[train]\nlog = "tensorboard"\n')  # a string is a list of one
    assert resolve_config(config_file=toml).train.log == ["tensorboard"]
    for bad in ('log = [1]', 'log = [["a"]]', 'log = {a = 1}', 'log = ["a b"]'):
        toml.write_text(f'preset = "tiny"\n[train]\n{bad}\n')
        with pytest.raises(LmkitError, match="train.log"):
            resolve_config(config_file=toml)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(max_size=12), max_size=4) | st.text(max_size=20) | st.integers())
def test_any_train_log_value_is_accepted_and_round_trips_or_is_one_error(value):
    try:
        cfg = resolve_config(preset="tiny", flags={"train.log": value})
    except LmkitError as exc:
        assert "train.log" in str(exc)
        return
    assert all(isinstance(n, str) and n for n in cfg.train.log)
    import tomllib

    assert tomllib.loads(to_toml(cfg))["train"]["log"] == cfg.train.log
