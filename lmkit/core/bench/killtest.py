"""The crash-safety acceptance test: SIGKILL a training run at random moments, resume it each
time, and check that it ends bitwise equal to the same run left alone.

One uninterrupted reference run, then ONE victim run killed ``--kills`` times: each kill lands at
a random moment (most after a random training step, plus a random fraction of a log window, so
they fall inside steps, logging, validation and checkpoint saves; some during start-up, before
any run file exists). After each kill the victim is continued with ``lmkit train --resume RUN``
(or its first command again when the kill came before it wrote anything), until a last resume
runs to completion. The victim's ``checkpoint/model.safetensors`` must equal the reference's
tensor for tensor, and its ``metrics.jsonl`` must match record for record (timing fields aside).

    python -m lmkit.core.bench.killtest --kills 20 --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TIMING = {"seconds", "train_seconds", "val_seconds", "clock_seconds", "tok_s", "mfu", "eta_s"}


def _env(threads: int) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[3])  # this lmkit, whatever is installed
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""),
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _last_step(metrics: Path) -> int:
    """The last step logged (0 if none); tolerant of a torn line."""
    try:
        lines = metrics.read_text(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            continue
    return 0


def _logged_since(metrics: Path, since_ns: int, step: int) -> bool:
    """Whether ``metrics`` was written after ``since_ns`` and has logged ``step``."""
    try:
        fresh = metrics.stat().st_mtime_ns >= since_ns
    except OSError:
        return False
    return fresh and _last_step(metrics) >= step


def _checkpoint_step(run_dir: Path) -> int:
    from lmkit.core import checkpoint

    found = checkpoint.find_checkpoint(run_dir) if run_dir.exists() else None
    state = checkpoint.complete_state(found) if found else None
    return int(state["step"]) if state else 0


def _records(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            out.append({k: v for k, v in json.loads(line).items() if k not in TIMING})
    return out


def _weights_equal(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(
        wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]) for k in wa)


def _state_of(run_dir: Path) -> str:
    """What the victim left: the checkpoint it would resume from, or why it restarts."""
    from lmkit.core import checkpoint, runs

    leftovers = [n for n in (checkpoint.TMP_DIR, checkpoint.OLD_DIR) if (run_dir / n).exists()]
    mid = f" (mid-save: {', '.join(leftovers)} left)" if leftovers else ""
    if runs.has_checkpoint(run_dir):
        found = checkpoint.find_checkpoint(run_dir)
        state = checkpoint.complete_state(found) if found else None
        where = "" if found is None or found.name == checkpoint.CHECKPOINT_DIR else \
            f" in {found.name}"
        return f"checkpoint step {state['step'] if state else '?'}{where}{mid}"
    if runs.has_run_files(run_dir):
        return f"restart (run files, no checkpoint){mid}"
    return "fresh start (no run files yet)"


def kill_test(
    *,
    kills: int = 20,
    steps: int = 300,
    preset: str = "tiny",
    work: Path | None = None,
    data: Path | None = None,
    seed: int = 0,
    sets: Sequence[str] = (),
    threads: int = 1,
    startup_share: float = 0.15,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the kill test; return the report (``equal_weights``, ``equal_metrics``, ``kills``)."""
    log = log or (lambda s: None)
    rng = random.Random(seed)
    work = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="lmkit-killtest-"))
    work.mkdir(parents=True, exist_ok=True)
    env = _env(threads)
    base = [sys.executable, "-m", "lmkit", "train", "--preset", preset, "--steps", str(steps),
            "--quiet", *(["--data", str(data)] if data else []),
            *[a for s in sets for a in ("--set", s)]]
    ref, victim = work / "reference", work / "victim"
    for d in (ref, victim):
        shutil.rmtree(d, ignore_errors=True)

    t0 = time.perf_counter()
    proc = subprocess.Popen([*base, "--out", str(ref)], env=env, stderr=subprocess.PIPE,
                            text=True)
    first_log = None
    while proc.poll() is None:
        if first_log is None and _last_step(ref / "metrics.jsonl") > 0:
            first_log = time.perf_counter() - t0
        time.sleep(0.02)
    ref_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed: {proc.stderr.read() if proc.stderr else ''}")
    startup = first_log or ref_seconds / 2
    step_seconds = max(ref_seconds - startup, 1e-3) / steps
    log(f"reference: {steps} steps in {ref_seconds:.1f} s (start-up {startup:.1f} s, "
        f"{1e3 * step_seconds:.0f} ms/step)")

    # targets stop short of the end, so that a kill lands before the run finishes on its own
    targets = sorted(rng.randint(1, max(1, steps - max(2, steps // 20))) for _ in range(kills))
    report_kills: list[dict[str, Any]] = []
    first = [*base, "--out", str(victim), "--resume", "auto"]
    window = step_seconds * 10  # a random fraction of a few steps past the target
    for i in range(kills):
        cmd = ["train", "--resume", str(victim), "--quiet"]
        cmd = [sys.executable, "-m", "lmkit", *cmd] if (victim / "config.toml").exists() \
            else first
        before = _state_of(victim) if victim.exists() else "fresh start (no run files yet)"
        err_path = work / f"victim-{i:02d}.stderr"
        with open(err_path, "w") as err:
            start, launched = time.perf_counter(), time.time_ns()
            proc = subprocess.Popen(cmd, env=env, stderr=err, stdout=subprocess.DEVNULL)
            early = rng.random() < startup_share
            if early:
                deadline = start + rng.uniform(0, startup)
                while proc.poll() is None and time.perf_counter() < deadline:
                    time.sleep(0.005)
            else:  # after a step this process trained (the log's tail may be the last one's)
                need = max(targets[i], _checkpoint_step(victim) + 1)
                while proc.poll() is None and not _logged_since(victim / "metrics.jsonl",
                                                                launched, need):
                    time.sleep(0.01)
                deadline = time.perf_counter() + rng.uniform(0, window)
                while proc.poll() is None and time.perf_counter() < deadline:
                    time.sleep(0.002)
            finished = proc.poll() is not None
            if not finished:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            at = time.perf_counter() - start
        stderr = err_path.read_text()
        entry = {
            "kill": i + 1, "started_from": before, "seconds": round(at, 2),
            "logged_step": _last_step(victim / "metrics.jsonl"),
            "target_step": None if early else targets[i], "early": early,
            "finished_first": finished, "returncode": proc.returncode,
            "recovered_mid_save": "recovered the checkpoint" in stderr,
            "stale_lock": "stale lock" in stderr,
            "left": _state_of(victim) if victim.exists() else "fresh start (no run files yet)",
        }
        report_kills.append(entry)
        what = "finished before the kill" if finished else \
            f"SIGKILL at {at:.2f} s ({'start-up' if early else f'after step {targets[i]}'})"
        log(f"kill {i + 1:2d}/{kills}: started from {before}; {what}; last logged step "
            f"{entry['logged_step']}; left {entry['left']}"
            + ("; took over a stale lock" if entry["stale_lock"] else "")
            + ("; promoted an interrupted save" if entry["recovered_mid_save"] else ""))
        if finished and proc.returncode != 0:
            raise RuntimeError(f"victim segment {i + 1} failed:\n{stderr}")

    final_from = _state_of(victim) if victim.exists() else "fresh start (no run files yet)"
    cmd = [sys.executable, "-m", "lmkit", "train", "--resume", str(victim), "--quiet"] \
        if (victim / "config.toml").exists() else first
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the final resume failed:\n{done.stderr}")
    log(f"final resume from {final_from}: exit {done.returncode}")

    equal_weights = _weights_equal(ref / "checkpoint" / "model.safetensors",
                                   victim / "checkpoint" / "model.safetensors")
    ema = [d / "checkpoint" / "ema.safetensors" for d in (ref, victim)]
    if any(p.exists() for p in ema):  # train.ema: the weights' average must match too
        equal_weights = equal_weights and all(p.exists() for p in ema) and _weights_equal(*ema)
    equal_metrics = _records(ref) == _records(victim)
    starts = [k["left"] for k in report_kills if not k["finished_first"]]
    summary = {
        "from_checkpoint": sum(s.startswith("checkpoint") for s in starts),
        "restart_no_checkpoint": sum(s.startswith("restart") for s in starts),
        "fresh_start": sum(s.startswith("fresh") for s in starts),
        "mid_save_recoveries": sum(k["recovered_mid_save"] for k in report_kills),
        "finished_before_kill": sum(k["finished_first"] for k in report_kills),
    }
    log(f"{len(starts)} kills: {summary['from_checkpoint']} resumed from a checkpoint, "
        f"{summary['restart_no_checkpoint']} restarted from step 0 (run files, no checkpoint), "
        f"{summary['fresh_start']} started afresh (killed before any run file); "
        f"{summary['mid_save_recoveries']} promoted an interrupted checkpoint save; "
        f"weights{' and their EMA' if ema[0].exists() else ''} bitwise equal: "
        f"{equal_weights}; metrics equal: {equal_metrics}")
    return {"work": str(work), "reference_seconds": ref_seconds, "kills": report_kills,
            "summary": summary, "equal_weights": equal_weights, "equal_metrics": equal_metrics}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmkit.core.bench.killtest",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--data", type=Path, help="prepared data [default: the default corpus]")
    parser.add_argument("--work", type=Path, help="where the two runs go [default: a temp dir]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config for both runs (default: none, the preset's defaults)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON at the end")
    args = parser.parse_args(argv)
    report = kill_test(kills=args.kills, steps=args.steps, preset=args.preset, work=args.work,
                       data=args.data, seed=args.seed, sets=args.sets, threads=args.threads)
    if args.json:
        from lmkit.core import jsonfile

        print(jsonfile.dumps(report, indent=1))
    return 0 if report["equal_weights"] and report["equal_metrics"] else 1


if __name__ == "__main__":
    sys.exit(main())
