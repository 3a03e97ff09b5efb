"""Crash-safe runs (issue 14): every way a run can be cut short leaves it resumable, and a
resumed run ends bitwise equal to the uninterrupted one. Tests are named after the defect."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmkit.core import atomic, runs
from lmkit.core import checkpoint as ckpt_mod
from lmkit.core import train as train_mod
from lmkit.core.bench.killtest import TIMING  # the fields that differ between any two runs
from lmkit.core.config import PRESETS, resolve_config
from lmkit.core.data import open_data
from lmkit.core.plan import plan_training
from lmkit.core.runlock import LOCK_FILE, RunLock
from lmkit.core.train import TrainingInterrupted, train
from lmkit.errors import LmkitError
from tests.test_cli import run_cli

FAST = ["train.seq_len=32", "train.batch_tokens=256", "train.log_every=2",
        "train.val_tokens=512", "train.dtype=fp32", "train.ckpt_seconds=0"]


def cfg_of(tiny_data, steps=6, extra=()):
    return resolve_config(preset="tiny", flags={"train.steps": steps, "data.path": str(tiny_data)},
                          sets=[*FAST, *extra])


def weights(run_dir, name="checkpoint"):
    return load_file(str(run_dir / name / "model.safetensors"))


def assert_same_weights(a_dir, b_dir):
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def records(run_dir):
    """metrics.jsonl without the timing fields (which differ between any two runs)."""
    out = []
    for r in runs.read_metrics(run_dir):
        out.append({k: v for k, v in r.items() if k not in TIMING})
    return out


def resume(tiny_data, run_dir, steps=6):
    plan = plan_training(config_file=None, preset=None, flags={"train.steps": steps}, sets=(),
                         out=run_dir, resume="auto")
    return train(plan.cfg, open_data(tiny_data), plan.run_dir, resume=plan.resume,
                 restart=plan.restart)


def signal_at(monkeypatch, at_step, signum=signal.SIGTERM):
    """Send ``signum`` to this process during step ``at_step`` (1-based)."""
    real = train_mod.train_step

    def step_then_signal(setup, model, optimizers, loader, accum, step):
        stats = real(setup, model, optimizers, loader, accum, step)
        if step + 1 == at_step:
            os.kill(os.getpid(), signum)
        return stats

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """The uninterrupted 6-step reference run."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(cfg_of(tiny_data), open_data(tiny_data), run_dir)
    return run_dir


def cli_train(tiny_data, out, *extra):
    sets = [a for s in FAST for a in ("--set", s)]
    return ["train", "--objective", "ar", "--preset", "tiny", "--steps", "6", "--data",
            str(tiny_data), "--out", str(out), "--quiet", *sets, *extra]


def one_line_error(code, err, *needles):
    assert code == 1, err
    assert "Traceback" not in err
    text = " ".join(err.split())
    assert text.startswith("Error:"), err
    for needle in needles:
        assert needle in text, (needle, err)


# -- 1. a crash loses the whole run with default settings -----------------------------------------
def test_1_every_preset_checkpoints_by_time():
    base = resolve_config(preset="tiny", flags={"train.steps": 1})
    assert base.train.ckpt_seconds > 0
    for name in PRESETS:
        cfg = resolve_config(preset=name)
        assert cfg.train.ckpt_seconds > 0, name


def test_1_periodic_checkpoints_happen_by_time(tiny_data, tmp_path, monkeypatch):
    saved = []
    real = train_mod.save_checkpoint
    monkeypatch.setattr(train_mod, "save_checkpoint",
                        lambda run_dir, m, o, state: saved.append(state["step"]) or real(
                            run_dir, m, o, state))
    train(cfg_of(tiny_data, steps=4, extra=["train.ckpt_seconds=1e-9"]), open_data(tiny_data),
          tmp_path / "run")
    assert saved == [1, 2, 3, 4]


def test_1_sigterm_checkpoints_the_step_and_exits_143(tiny_data, tmp_path, monkeypatch, capsys,
                                                     straight):
    before = signal.getsignal(signal.SIGTERM)
    signal_at(monkeypatch, 3)
    code, _, err = run_cli(cli_train(tiny_data, tmp_path / "run"), capsys)
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    assert runs.read_metrics(tmp_path / "run")[-1]["step"] <= 3
    assert ckpt_mod.read_state(tmp_path / "run")["step"] == 3
    monkeypatch.undo()
    resume(tiny_data, tmp_path / "run")
    assert_same_weights(straight, tmp_path / "run")


def test_1_sigint_stops_after_the_step_via_the_api(tiny_data, tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGINT)  # default, or SIG_IGN under nohup
    signal_at(monkeypatch, 2, signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="SIGINT after step 2"):
        train(cfg_of(tiny_data), open_data(tiny_data), tmp_path / "run")
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is restored
    assert not (tmp_path / "run" / LOCK_FILE).exists()


@pytest.mark.parametrize("form", ["auto", "path"])
def test_1_resume_of_a_run_without_checkpoint_restarts_from_step_0(tiny_data, tmp_path, capsys,
                                                                   straight, form):
    run = tmp_path / "run"
    train(cfg_of(tiny_data, steps=2), open_data(tiny_data), run)
    shutil.rmtree(run / "checkpoint")  # as if killed before its first checkpoint
    args = ["--resume", "auto"] if form == "auto" else ["--resume", str(run)]
    with pytest.warns(atomic.RecoveryWarning, match="restarting it from step 0"):
        code, _, err = run_cli(cli_train(tiny_data, run, *args), capsys)
    assert code == 0, err
    assert "pass --resume auto" not in err
    assert_same_weights(straight, run)
    assert records(run) == records(straight)  # the old log was reset, not appended to


def test_1_resume_of_nothing_says_what_to_do(tmp_path, capsys):
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "nope"), "--quiet"], capsys)
    one_line_error(code, err, "holds no run", "lmkit train --out")


# -- 2. a torn last line of metrics.jsonl ---------------------------------------------------------
def test_2_torn_metrics_tail_is_dropped_and_the_run_resumes(tiny_data, tmp_path, straight):
    run = tmp_path / "run"
    train(cfg_of(tiny_data, extra=["train.steps=3"]), open_data(tiny_data), run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"type": "train", "step": 4, "tok')  # the disk filled mid-write
    with pytest.warns(atomic.RecoveryWarning, match="torn last line"):
        assert [r["step"] for r in runs.read_metrics(run)][-1] == 3
    with pytest.warns(atomic.RecoveryWarning, match="torn last line"):
        resume(tiny_data, run)
    assert_same_weights(straight, run)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_2_damage_inside_the_log_is_one_clear_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(LmkitError, match="line 2 is corrupt"):
        runs.MetricsLog(path).records()


# -- 3. a crash between the two renames of save_checkpoint ----------------------------------------
class Crash(BaseException):
    """The process died here: no cleanup of ours runs after it."""


@pytest.mark.parametrize("survive", range(6))
def test_3_crash_at_any_point_of_a_checkpoint_save_is_recovered(tiny_data, tmp_path, monkeypatch,
                                                                straight, survive):
    """Let ``survive`` renames of the final save of a resumed run succeed, then die (5: die
    removing .checkpoint.old after both renames). Whatever is left resumes bitwise equal."""
    run = tmp_path / "run"
    signal_at(monkeypatch, 3)  # a checkpoint at step 3 of the same 6-step run
    with pytest.raises(TrainingInterrupted):
        train(cfg_of(tiny_data), open_data(tiny_data), run)
    monkeypatch.undo()
    real_replace, real_rmtree = os.replace, shutil.rmtree
    calls = {"replace": 0, "crashed": False}

    def replace(src, dst):
        if calls["crashed"]:
            return real_replace(src, dst)
        if calls["replace"] == survive:
            calls["crashed"] = True
            raise Crash
        calls["replace"] += 1
        return real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if calls["crashed"]:
            return None  # a dead process removes nothing
        if survive == 5 and calls["replace"] == 5 and str(path).endswith(ckpt_mod.OLD_DIR):
            calls["crashed"] = True
            raise Crash
        return real_rmtree(path, *args, **kwargs)

    real_save = ckpt_mod.save_checkpoint

    def save(run_dir, model, optimizers, state):
        if state["step"] < 6:
            return real_save(run_dir, model, optimizers, state)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        try:
            return real_save(run_dir, model, optimizers, state)
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
            monkeypatch.setattr(shutil, "rmtree", real_rmtree)

    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    with pytest.raises(Crash):
        resume(tiny_data, run)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    if survive == 4:
        assert not (run / "checkpoint").exists()  # the reviewer's case: only .old and .tmp
    expected = 6 if survive >= 3 else 3
    # readers (eval, sample, pack) find the newest complete copy without changing anything
    assert ckpt_mod.read_state(run)["step"] == expected
    loaded = runs.load_run(run)
    assert loaded.state["step"] == expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", atomic.RecoveryWarning)
        resume(tiny_data, run)
    assert_same_weights(straight, run)
    assert records(run) == records(straight)
    assert not (run / ckpt_mod.TMP_DIR).exists()


# -- 4. damaged checkpoint files ------------------------------------------------------------------
def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path):
    path.write_bytes(b"\x00garbage" * 10)


def _drop_key(path):
    tensors = load_file(str(path))
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(path))


def _reshape(path):
    tensors = load_file(str(path))
    key = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(path))


def _reshape_opt(path):
    tensors = load_file(str(path))
    key = next(k for k, v in tensors.items() if k.startswith("opt") and v.dim() == 2)
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(path))


@pytest.mark.parametrize("file,damage,needle", [
    ("optim.safetensors", _truncate, "corrupt or truncated"),
    ("optim.safetensors", _garbage, "corrupt or truncated"),
    ("optim.safetensors", lambda p: p.unlink(), "is missing"),
    ("optim.safetensors", _reshape_opt, "has shape (3, 3)"),
    ("model.safetensors", _truncate, "is corrupt"),
    ("model.safetensors", _drop_key, "missing"),
    ("model.safetensors", _reshape, "has shape"),
])
def test_4_damaged_checkpoint_files_are_one_clear_error(tiny_data, tmp_path, capsys, file, damage,
                                                        needle):
    run = tmp_path / "run"
    train(cfg_of(tiny_data, steps=2), open_data(tiny_data), run)
    damage(run / "checkpoint" / file)
    with pytest.raises(LmkitError) as info:
        resume(tiny_data, run, steps=4)
    assert needle in str(info.value) and file in str(info.value)
    assert "\n" not in str(info.value)
    code, _, err = run_cli(cli_train(tiny_data, run, "--resume", "auto"), capsys)
    one_line_error(code, err, needle)
    if file == "model.safetensors":  # eval and sample read the same file
        code, _, err = run_cli(["eval", str(run), "--max-tokens", "200"], capsys)
        one_line_error(code, err, needle)


# -- 5. NaN never detected ------------------------------------------------------------------------
@pytest.mark.parametrize("clip", ["0", "1.0"])
def test_5_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(
        tiny_data, tmp_path, capsys, clip, monkeypatch):
    from lmkit.builtin.ar import ARObjective

    real_loss = ARObjective.loss

    def diverging(self, model, batch):  # what a learning rate far too large does, from step 3
        out = real_loss(self, model, batch)
        if batch.step >= 2:
            out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(ARObjective, "loss", diverging)
    run = tmp_path / "run"
    code, _, err = run_cli(cli_train(tiny_data, run, "--set", "train.ckpt_every=1", "--set",
                                     f"optim.grad_clip={clip}"), capsys)
    one_line_error(code, err, "diverged at step", "optim.lr")
    text = " ".join(err.split())
    bad = int(text.split("diverged at step ")[1].split(":")[0])
    state = ckpt_mod.read_state(run)
    assert state["step"] < bad
    assert f"step {state['step']}" in text
    assert all(torch.isfinite(v).all() for v in weights(run).values())
    assert all(r["step"] < bad for r in runs.read_metrics(run))


def test_5_non_finite_weights_are_never_checkpointed(tiny_data, tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(LmkitError, match="non-finite"):
        ckpt_mod.save_checkpoint(tmp_path, model, [], {"step": 1})
    assert not (tmp_path / "checkpoint").exists()


# -- 6. disk full ---------------------------------------------------------------------------------
def test_6_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_data, tmp_path, capsys,
                                                               monkeypatch):
    run = tmp_path / "run"
    train(cfg_of(tiny_data, steps=2), open_data(tiny_data), run)
    before = weights(run)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_cli(cli_train(tiny_data, run, "--resume", "auto"), capsys)
    monkeypatch.undo()
    one_line_error(code, err, "no space left", "checkpoint", "MB needed", "free",
                   "previous checkpoint is intact")
    assert not (run / ckpt_mod.TMP_DIR).exists()
    assert not list((run / "checkpoint").glob(".*.tmp"))
    assert ckpt_mod.read_state(run)["step"] == 2
    after = weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_6_disk_full_writing_metrics_is_one_error_and_no_torn_line(tiny_data, tmp_path, capsys,
                                                                  monkeypatch):
    run = tmp_path / "run"
    real_open = open
    writes = {"n": 0}

    class HalfWriter:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            writes["n"] += 1
            if writes["n"] >= 3:
                self.fh.write(text[: len(text) // 2])
                self.fh.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(text)

        def flush(self):
            self.fh.flush()

    def fake_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return HalfWriter(fh) if str(path).endswith("metrics.jsonl") and "a" in mode else fh

    monkeypatch.setattr(runs, "open", fake_open, raising=False)
    code, _, err = run_cli(cli_train(tiny_data, run), capsys)
    one_line_error(code, err, "no space left", "metrics.jsonl", "free")
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_6_atomic_writer_reports_a_full_disk_and_leaves_no_temp_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(atomic.DiskFullError, match=r"x\.bin \(about 0\.0 MB needed"):
        atomic.write_bytes(tmp_path / "x.bin", b"abc", durable=True)
    assert list(tmp_path.iterdir()) == []


# -- 7. no lock on a run directory ----------------------------------------------------------------
def test_7_a_second_writer_is_refused_naming_the_holder(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg_of(tiny_data, steps=2), open_data(tiny_data), run)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = RunLock(run)
        lock.me = {**lock.me, "pid": holder.pid, "proc_start": None}
        lock.acquire()  # as the other process would have
        code, _, err = run_cli(cli_train(tiny_data, run, "--resume", "auto"), capsys)
        one_line_error(code, err, f"pid {holder.pid}", "being trained")
        assert ckpt_mod.read_state(run)["step"] == 2
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and taken over
    with pytest.warns(atomic.RecoveryWarning, match="stale lock"):
        resume(tiny_data, run, steps=3)
    assert ckpt_mod.read_state(run)["step"] == 3
    assert not (run / LOCK_FILE).exists()  # released at the end


def test_7_lock_is_released_on_error_and_refuses_the_same_process(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(LmkitError, match="already being trained by this process"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


# -- 8. the first logged loss after a resume ------------------------------------------------------
def test_8_resumed_metrics_equal_the_uninterrupted_run(tiny_data, tmp_path, monkeypatch, straight):
    run = tmp_path / "run"
    signal_at(monkeypatch, 3)  # between two log steps (log_every=2)
    with pytest.raises(TrainingInterrupted):
        train(cfg_of(tiny_data), open_data(tiny_data), run)
    monkeypatch.undo()
    resume(tiny_data, run)
    assert_same_weights(straight, run)
    assert records(run) == records(straight)


def test_8_a_finished_run_resumed_again_logs_nothing_twice(tiny_data, tmp_path, straight):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    resume(tiny_data, run)
    assert records(run) == records(straight)


# -- 9. the acceptance kill test ------------------------------------------------------------------
@pytest.mark.slow
def test_9_sigkill_at_random_moments_ends_bitwise_equal(tiny_data, tmp_path):
    from lmkit.core.bench.killtest import kill_test

    report = kill_test(kills=3, steps=30, work=tmp_path, data=tiny_data, seed=0,
                       sets=["train.ckpt_seconds=0.5"], log=print)
    assert report["equal_weights"] and report["equal_metrics"], report
    assert len(report["kills"]) == 3


def _full_disk_for(monkeypatch, *names):
    """Writes through the one atomic writer to a file named like ``names`` hit ENOSPC midway."""
    real_open = open

    class Half:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            self.fh.flush()

        def fileno(self):
            return self.fh.fileno()

    def fake_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        hit = "x" in mode and any(n in Path(path).name for n in names)
        return Half(fh) if hit else fh

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)


def _leftovers(root):
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp")]


def test_6_disk_full_writing_eval_and_pack_results_keeps_the_previous_files(
        tiny_data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    train(cfg_of(tiny_data, steps=2), open_data(tiny_data), run)
    code, out, err = run_cli(["eval", str(run), "--max-tokens", "256", "--json"], capsys)
    assert code == 0, err
    previous = (run / "eval.json").read_bytes()

    _full_disk_for(monkeypatch, "eval.json", "step")
    code, _, err = run_cli(["eval", str(run), "--max-tokens", "512", "--json"], capsys)
    one_line_error(code, err, "no space left", "free")
    assert (run / "eval.json").read_bytes() == previous and not _leftovers(run)
    json.loads(previous)

    _full_disk_for(monkeypatch, "artifact.")
    code, _, err = run_cli(["pack", str(run), "--bits", "8", "--max-tokens", "256"], capsys)
    one_line_error(code, err, "no space left", "artifact")
    assert not list(run.glob("artifact.*")) and not _leftovers(run)
    monkeypatch.undo()
    code, _, err = run_cli(["pack", str(run), "--bits", "8", "--max-tokens", "256"], capsys)
    assert code == 0, err  # nothing left behind stands in the way


def test_6_disk_full_preparing_data_leaves_no_partial_directory(sotu_docs, tmp_path, capsys,
                                                                  monkeypatch):
    from lmkit.core.data import ListCorpus, prepare_data

    _full_disk_for(monkeypatch, "_train_", "_val_", "manifest")
    out = tmp_path / "data"
    with pytest.raises(atomic.DiskFullError, match="no space left"):
        prepare_data(ListCorpus("tiny", sotu_docs[:4], "four speeches"), out, vocab_size=1024,
                     val_fraction=0.25)
    assert not out.exists() or not any(out.iterdir())
    assert not _leftovers(tmp_path)


def test_a_zombie_lock_holder_counts_as_gone():
    """A killed process not yet reaped (a torchrun rank whose launcher was killed) holds
    nothing: the lock's liveness check sees it as dead."""
    import time

    from lmkit.core.runlock import _alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(child.pid) and time.monotonic() < deadline:  # exited, not reaped: a zombie
            time.sleep(0.01)
        assert not _alive(child.pid)
        assert Path(f"/proc/{child.pid}").exists()  # still in the table: only its state says so
    finally:
        child.kill()
        child.wait()
