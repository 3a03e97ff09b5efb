"""Data-parallel training under torchrun (issue 15, parts 1-2).

Default suite: the logic, without torchrun (the world-size-1 identity, accumulation arithmetic,
span assignment, keyed micro-batch seeds) and, in two forked gloo processes, the collectives
themselves: summed gradients, step statistics, and Muon's split Newton-Schulz equal to one
process's step bit for bit. Slow: real ``torchrun`` subprocesses (tiny preset, gloo on CPU):
2 ranks against 1 process for AR and MDLM (loss per step, final validation, ``lmkit eval``),
SIGKILL and ``--resume auto`` on 2 ranks and on 1, two "nodes" through the c10d rendezvous,
and ``lmkit compare`` under torchrun.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmkit.core import distributed
from lmkit.core.bench.killtest import TIMING  # the fields that differ between any two runs
from lmkit.core.data import RotatingLoader, write_shard
from lmkit.errors import LmkitError

REPO = Path(__file__).resolve().parents[1]


# -- logic, no process group ---------------------------------------------------------------------
def test_launch_env_reads_torchrun_variables():
    assert distributed.launch_env({}) is None  # not under torchrun
    env = distributed.launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert env == distributed.LaunchEnv(rank=3, world_size=4, local_rank=1)
    for bad in ({"RANK": "4", "WORLD_SIZE": "4"}, {"RANK": "x", "WORLD_SIZE": "2"},
                {"RANK": "0", "WORLD_SIZE": "0"}):
        with pytest.raises(LmkitError, match="torchrun environment"):
            distributed.launch_env(bad)


def test_single_process_is_the_identity():
    """Outside torchrun no collective runs and every helper returns what it was given."""
    assert not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    with distributed.session({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) as env:
        assert env is not None and not distributed.active()  # one rank: no group at all
    assert distributed.shard(7) == range(7)
    assert [distributed.micro_index(i) for i in range(3)] == [0, 1, 2]
    loss = torch.tensor(2.5)
    assert distributed.sum_step_stats(loss, {"a": 1.0}, 9) == (loss, {"a": 1.0}, 9)
    assert distributed.agree_step(1.25, False) == (1.25, False)
    assert distributed.broadcast_object({"x": 1}) == {"x": 1}
    assert distributed.on_main(lambda: 42) == 42
    assert distributed.from_main(lambda: 43) == 43
    log: list[str] = []
    assert distributed.main_only(log, "append") is log  # rank 0 keeps its writers


@pytest.mark.parametrize(("name", "args"), [
    ("pack", ["RUN"]), ("sample", ["RUN"]), ("export", ["RUN", "OUT"]), ("record", ["RUN"]),
    ("data prepare", []), ("bench train", []), ("bench all", [])])
@pytest.mark.parametrize("rank", [0, 1])
def test_single_process_commands_refuse_several_ranks(name, args, rank, monkeypatch, tmp_path,
                                                      capsys):
    """Under a 2-rank torchrun the commands that do not split their work refuse before they
    read or write anything: rank 0 says why in one line, rank 1 exits quietly, both with 1."""
    from lmkit.cli import main
    from lmkit.cli.display import console, output

    for printer in (console, output):  # rank 1 silences them: restored after the test
        monkeypatch.setattr(printer, "quiet", printer.quiet)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "session", contextlib.nullcontext)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([*name.split(), *(str(tmp_path / a) for a in args)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    if rank == 0:
        assert err.count("Error:") == 1 and f"`lmkit {name}` runs in one process" in err
        assert "without torchrun" in err
    else:
        assert err == ""
    assert list(tmp_path.iterdir()) == []  # nothing read (the paths do not exist), nothing written


@pytest.mark.parametrize("name", ["bench train", "bench all", "pack", "sample"])
def test_help_answers_under_several_ranks(name, monkeypatch, capsys):
    """``--help`` of a single-process command is parsed before the refusal: it still answers
    under torchrun (the bench group used to refuse before its subcommand saw ``--help``)."""
    from lmkit.cli import main
    from lmkit.cli.display import console, output

    for printer in (console, output):
        monkeypatch.setattr(printer, "quiet", printer.quiet)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "session", contextlib.nullcontext)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    main([*name.split(), "--help"])  # returns: no refusal, no exit status 1
    assert f"Usage: lmkit {name} [OPTIONS]" in capsys.readouterr().out


def test_a_torchrun_environment_without_its_rendezvous_is_one_clear_error(monkeypatch):
    """WORLD_SIZE set by hand (no MASTER_ADDR): the project's error, not a traceback."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(LmkitError, match="could not join torchrun's process group"):
        with distributed.session({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}):
            pass


def test_accumulation_keeps_the_global_batch():
    assert [distributed.split_accum(8, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(LmkitError, match="cannot be split evenly over 3 ranks"):
        distributed.split_accum(8, 3)
    # rank r's i-th micro-batch is global micro-batch i*W + r: together, 0..accum-1 once each
    for world in (1, 2, 4):
        got = sorted(i * world + r for r in range(world)
                     for i in range(distributed.split_accum(8, world)))
        assert got == list(range(8))


def test_shards_partition_in_order_on_batch_boundaries():
    for n in (0, 1, 5, 64, 1001):
        for world in (1, 2, 3, 8):
            for batch in (1, 4, 7):
                parts = [distributed.shard_of(n, r, world, batch) for r in range(world)]
                assert [i for p in parts for i in p] == list(range(n))
                assert all(p.start % batch == 0 for p in parts if len(p))
                full = [len(p) for p in parts if p.stop != n]  # the last share may be short
                assert not full or max(full) - min(full) <= batch
    assert distributed.shard(10, 4) == range(10)


def test_micro_seeds_are_keyed_by_seed_step_and_index():
    keys = {distributed.micro_seed(s, step, i) for s in (0, 1) for step in range(3)
            for i in range(4)}
    assert len(keys) == 24 and all(0 <= k < 2**63 for k in keys)
    assert distributed.micro_seed(5, 2, 1) == distributed.micro_seed(5, 2, 1)
    distributed.seed_micro_batch(5, 2, 1)
    a = torch.rand(4)
    distributed.seed_micro_batch(5, 2, 1)
    assert torch.equal(a, torch.rand(4))  # a micro-batch's draws depend on its key alone


def _shards(tmp_path: Path, sizes: list[int]) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, n in enumerate(sizes):
        paths.append(tmp_path / f"d_train_{i:03d}.bin")
        write_shard(paths[-1], rng.integers(0, 1000, n))
    return paths


def test_ranks_together_read_one_process_stream(tmp_path: Path):
    """Uneven group tails (where a span of N micro-batches would not fit but one does) are the
    case a per-rank span gets wrong: the striped stream must still be the 1-process one."""
    shards = _shards(tmp_path, [300, 260, 321, 280, 241])
    kw = dict(batch_size=2, seq_len=25, seed=7, group_size=2)
    one = RotatingLoader(shards, **kw)
    stream = [one.next_batch() for _ in range(60)]  # crosses groups and epochs
    assert one.state_dict()["epoch"] >= 1
    for world in (2, 3):
        loaders = [RotatingLoader(shards, **kw, rank=r, world_size=world) for r in range(world)]
        got = [ld.next_batch() for _ in range(60 // world) for ld in loaders]
        assert all(torch.equal(a, b) for a, b in zip(stream, got, strict=True))
        # the cursor is the same on every rank and equals the 1-process position
        assert all(ld.state_dict() == one.state_dict() for ld in loaders)


def test_loader_state_resumes_on_another_number_of_ranks(tmp_path: Path):
    shards = _shards(tmp_path, [300, 260, 321, 280, 241])
    kw = dict(batch_size=2, seq_len=25, seed=7, group_size=2)
    one = RotatingLoader(shards, **kw)
    stream = [one.next_batch() for _ in range(36)]
    two = [RotatingLoader(shards, **kw, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):
        for ld in two:
            ld.next_batch()
    state = two[0].state_dict()  # what rank 0 checkpoints after 12 micro-batches
    three = [RotatingLoader(shards, **kw, rank=r, world_size=3) for r in range(3)]
    for ld in three:
        ld.load_state_dict(state)
    got = [ld.next_batch() for _ in range(8) for ld in three]
    assert all(torch.equal(a, b) for a, b in zip(stream[12:], got, strict=True))


# -- collectives in two forked gloo processes ---------------------------------------------------
def _muon_case(seed: int):
    from lmkit.core.optim import Muon

    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in ((8, 4), (4, 8), (6, 6), (5, 3))]
    opt = Muon([dict(params=params, base_lr=0.04)], lr=0.04, momentum=0.9)
    return params, opt


def _collectives_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out: dict = {"rank": rank, "main": distributed.is_main(), "micro": [
            distributed.micro_index(i) for i in range(3)]}
        # gradients: rank r holds r+1 everywhere, and a grad only rank 1 has
        model = torch.nn.Linear(3, 2)
        model.weight.grad = torch.full((2, 3), float(rank + 1))
        model.bias.grad = torch.full((2,), 5.0) if rank == 1 else None
        distributed.sum_gradients(model)
        out["weight_grad"] = model.weight.grad.tolist()
        out["bias_grad"] = model.bias.grad.tolist()
        loss, metrics, tokens = distributed.sum_step_stats(torch.tensor(1.0 + rank),
                                                           {"m": 0.5 * rank}, 10 + rank)
        out["stats"] = [float(loss), metrics, tokens]
        out["agree"] = list(distributed.agree_step(3.0 if rank == 0 else 99.0, rank == 1))
        out["shard"] = list(distributed.shard(5))
        rows = torch.zeros(4, dtype=torch.float64)
        rows[list(distributed.shard(4))] = torch.tensor([1.5, 2.5], dtype=torch.float64) + 2 * rank
        distributed.all_sum(rows)
        out["rows"] = rows.tolist()
        out["broadcast"] = distributed.broadcast_object(f"from {rank}")
        out["from_main"] = distributed.from_main(lambda: f"ran on {rank}")
        try:
            distributed.on_main(lambda: (_ for _ in ()).throw(LmkitError("only rank 0 sees")))
        except LmkitError as exc:
            out["on_main"] = [type(exc).__name__, str(exc)]
        # Muon: the same gradients on both ranks; each runs half of the Newton-Schulz work
        out["muon"] = _muon_steps(*_muon_case(0))
        Path(out_dir, f"{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def _muon_steps(params, opt) -> list:
    """Three Muon steps on seeded gradients (the same on every rank); the parameters after."""
    for step in range(3):
        torch.manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return [p.detach().tolist() for p in params]


def test_collectives_and_split_muon_across_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    # the same Muon steps in this (single) process: no group, every matrix orthogonalised here
    # (first, so the forked workers inherit the optimizer machinery already imported)
    single = _muon_steps(*_muon_case(0))
    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(_collectives_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, start_method=method)
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["muon"] == single  # bit for bit: each update is one rank's, shared exactly
        assert r["weight_grad"] == [[1.5] * 3] * 2  # mean of 1 and 2
        assert r["bias_grad"] == [2.5, 2.5]  # (0 + 5) / 2: rank 0 stepped it too
        assert r["stats"] == [3.0, {"m": 0.5}, 21]
        assert r["agree"] == [3.0, True]  # rank 0's clock; rank 1's stop request
        assert r["rows"] == [1.5, 2.5, 3.5, 4.5]
        assert r["broadcast"] == "from 0"
        assert r["from_main"] == "ran on 0"
    assert res[0]["on_main"] == ["LmkitError", "only rank 0 sees"]
    assert res[1]["on_main"] == ["MainRankError", "only rank 0 sees"]
    assert [res[0]["main"], res[1]["main"]] == [True, False]
    assert res[0]["micro"] == [0, 2, 4] and res[1]["micro"] == [1, 3, 5]
    assert res[0]["shard"] == [0, 1] and res[1]["shard"] == [2, 3, 4]


def _pack_worker(rank: int, init_file: str, run_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from lmkit.core import pack

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        calls = []
        write = pack.quantize_and_write

        def counted(*args, **kwargs):
            calls.append(rank)
            return write(*args, **kwargs)

        pack.quantize_and_write = counted
        result = pack.pack_run(run_dir, device="cpu", out=Path(out_dir) / "artifact.bin",
                               method="rtn", max_tokens=1024)
        Path(out_dir, f"{rank}.json").write_text(json.dumps({"quantized": calls, **result}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_pack_under_two_ranks_writes_once_and_scores_in_shares(tiny_data, tmp_path):
    """`lmkit compare --pack` under torchrun: rank 0 alone quantizes and writes the artifact
    (and pack.json); both ranks score it, each its share, to one process's figures."""
    import torch.multiprocessing as mp

    from lmkit.core.config import resolve_config
    from lmkit.core.data import open_data
    from lmkit.core.pack import PACK_FILE, pack_run
    from lmkit.core.train import train

    run_dir = tmp_path / "run"
    cfg = resolve_config(preset="tiny", flags={"train.steps": 4, "data.path": str(tiny_data)},
                         sets=FAST)
    train(cfg, open_data(tiny_data), run_dir)
    torch.set_num_threads(1)  # each rank's thread count (float32 results depend on it)
    single = pack_run(run_dir, device="cpu", out=tmp_path / "single.bin", method="rtn",
                      max_tokens=1024)
    (run_dir / PACK_FILE).unlink()
    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(_pack_worker, args=(str(tmp_path / "init"), str(run_dir), str(tmp_path)),
                       nprocs=2, start_method=method)
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert res[0]["quantized"] == [0] and res[1]["quantized"] == []
    assert (tmp_path / "artifact.bin").read_bytes() == (tmp_path / "single.bin").read_bytes()
    assert json.loads((run_dir / PACK_FILE).read_text())["artifact_bytes"] \
        == single["artifact_bytes"]
    for r in res:
        assert r["artifact_bytes"] == single["artifact_bytes"]
        for key in ("metrics", "metrics_before"):
            got = {m["name"]: m for m in r[key]}
            for m in single[key]:
                assert (got[m["name"]]["tokens"], got[m["name"]]["bytes"]) \
                    == (m["tokens"], m["bytes"])
                assert got[m["name"]]["value"] == pytest.approx(m["value"], rel=1e-12, abs=0)


# -- torchrun end to end (slow) -------------------------------------------------------------------
FAST = ["train.seq_len=32", "train.batch_tokens=256", "train.micro_batch=2", "train.log_every=1",
        "train.val_tokens=512", "train.dtype=fp32", "train.ckpt_seconds=0", "train.warmup_steps=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lmkit_argv(args: list[str], nproc: int = 1, rdzv: list[str] | None = None) -> list[str]:
    if nproc == 1 and rdzv is None:
        return [sys.executable, "-m", "lmkit", *args]
    launch = rdzv or ["--standalone", "--nproc-per-node", str(nproc)]
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "lmkit", *args]


def run_lmkit(args: list[str], nproc: int = 1, timeout: float = 600) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc > 1:  # a fresh rendezvous port per launch: tests may run side by side
        args_ = lmkit_argv(args, nproc, ["--nnodes", "1", "--nproc-per-node", str(nproc),
                                         "--rdzv-backend", "c10d",
                                         "--rdzv-endpoint", f"localhost:{free_port()}"])
    else:
        args_ = lmkit_argv(args)
    proc = subprocess.run(args_, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def train_args(objective: str, out: Path, data: Path, steps: int, extra=()) -> list[str]:
    sets = [a for s in [*FAST, *extra] for a in ("--set", s)]
    return ["train", "--objective", objective, "--preset", "tiny", "--data", str(data),
            "--steps", str(steps), "--seed", "3", "--out", str(out), "--quiet", *sets]


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


def assert_same_run(a: Path, b: Path, rel_loss: float = 1e-5, abs_bpb: float = 1e-6) -> None:
    """Same loss per step (relative) and the same final validation bpb (absolute)."""
    ra, rb = train_records(a), train_records(b)
    ta = [r for r in ra if r["type"] == "train"]
    tb = [r for r in rb if r["type"] == "train"]
    assert [r["step"] for r in ta] == [r["step"] for r in tb] and len(ta) >= 4
    for x, y in zip(ta, tb, strict=True):
        assert abs(x["loss"] - y["loss"]) <= rel_loss * abs(x["loss"]), (x, y)
        assert x["trained_tokens"] == y["trained_tokens"] and x["lr_mult"] == y["lr_mult"]
    va = [r for r in ra if r["type"] == "val"][-1]["metrics"]
    vb = [r for r in rb if r["type"] == "val"][-1]["metrics"]
    assert [m["name"] for m in va] == [m["name"] for m in vb]
    for x, y in zip(va, vb, strict=True):
        assert abs(x["value"] - y["value"]) <= abs_bpb, (x, y)
        assert (x["tokens"], x["bytes"]) == (y["tokens"], y["bytes"])


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ar", "mdlm"])
def test_two_ranks_train_and_evaluate_what_one_process_does(objective, tiny_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_lmkit(train_args(objective, one, tiny_data, 8))
    run_lmkit(train_args(objective, two, tiny_data, 8), nproc=2)
    assert_same_run(one, two)
    meta = json.loads((two / "run.json").read_text())
    assert meta["distributed"] == {"world_size": 2, "backend": "gloo"}
    # `lmkit eval` sharded over 2 ranks scores what one process scores (float64 sum order)
    eval_args = ["eval", str(one), "--max-tokens", "1024", "--json"]
    single = json.loads(run_lmkit(eval_args))
    sharded = json.loads(run_lmkit(eval_args, nproc=2))  # only rank 0 prints
    assert [m["name"] for m in single["metrics"]] == [m["name"] for m in sharded["metrics"]]
    assert len(single["metrics"]) >= (1 if objective == "ar" else 3)
    for x, y in zip(single["metrics"], sharded["metrics"], strict=True):
        assert (x["tokens"], x["bytes"], x["kind"]) == (y["tokens"], y["bytes"], y["kind"])
        assert y["value"] == pytest.approx(x["value"], rel=1e-12, abs=0), (x, y)
        if x["stderr"] is not None:
            assert y["stderr"] == pytest.approx(x["stderr"], rel=1e-9)


def _processes_of(run_dir: Path) -> list[int]:
    """Live (not zombie) processes whose command line names ``run_dir``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError, ValueError):
            continue
        if proc.name.isdigit() and not zombie and str(run_dir).encode() in argv:
            found.append(int(proc.name))
    return found


def _kill_after_checkpoint(argv: list[str], run_dir: Path, at_least: int, final: int) -> int:
    """Start a 2-rank run, SIGKILL the whole process group once a checkpoint of step
    >= ``at_least`` exists; return the checkpointed step (must be short of ``final``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    state = run_dir / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    step = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                step = int(json.loads(state.read_text())["step"])
            except (OSError, ValueError, KeyError):
                step = 0
            if step >= at_least:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, mid-step
        proc.wait()
        # torchrun starts its ranks in sessions of their own: kill every process of this job
        # (as a scheduler would) and wait until none is left
        gone = time.monotonic() + 30
        while time.monotonic() < gone and (pids := _processes_of(run_dir)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
    assert at_least <= step < final, f"not killed mid-run (checkpoint step {step})"
    return step


@pytest.mark.slow
def test_sigkill_during_two_rank_run_resumes_where_uninterrupted_ends(tiny_data, tmp_path):
    steps = 24
    slow = ["train.batch_tokens=2048", "train.ckpt_every=1"]  # 32 micro-batches a step
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_lmkit(train_args("mdlm", whole, tiny_data, steps, slow), nproc=2)
    argv = lmkit_argv(train_args("mdlm", cut, tiny_data, steps, slow), 2)
    _kill_after_checkpoint(argv, cut, at_least=3, final=steps)
    on_one = tmp_path / "cut-on-one"
    shutil.copytree(cut, on_one)
    (on_one / ".lock").unlink(missing_ok=True)  # a copy's lock names the dead process
    resume = ["--resume", "auto"]
    run_lmkit([*train_args("mdlm", cut, tiny_data, steps, slow), *resume], nproc=2)
    assert train_records(cut) == train_records(whole)  # same ranks: the same run exactly
    from safetensors.torch import load_file

    a = load_file(str(whole / "checkpoint" / "model.safetensors"))
    b = load_file(str(cut / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the 2-rank checkpoint resumes on 1 process too (the global batch is the same)
    run_lmkit([*train_args("mdlm", on_one, tiny_data, steps, slow), *resume])
    assert_same_run(on_one, whole)


@pytest.mark.slow
def test_two_nodes_over_loopback_rendezvous(tiny_data, tmp_path):
    """2 "nodes" x 1 process through torchrun's c10d rendezvous, as on two machines."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "nodes"
    args = train_args("ar", run_dir, tiny_data, 6)
    procs = [subprocess.Popen(
        lmkit_argv(args, rdzv=["--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
                               str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"localhost:{port}", "--rdzv-id", "lmkit-test"]),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["distributed"]["world_size"] == 2
    one = tmp_path / "one"
    run_lmkit(train_args("ar", one, tiny_data, 6))
    assert_same_run(one, run_dir)


@pytest.mark.slow
def test_compare_under_torchrun(tiny_data, tmp_path):
    """Both ranks train and score; rank 0 alone packs and samples (--pack, --gen), and every
    figure is one process's."""
    out = tmp_path / "cmp"
    sets = [a for s in FAST for a in ("--set", s)]
    run_lmkit(["compare", "--objectives", "ar,mdlm", "--preset", "tiny", "--steps", "4",
               "--data", str(tiny_data), "--max-tokens", "1024", "--out", str(out), "--pack",
               "--gen", *sets], nproc=2)
    report = json.loads((out / "compare.json").read_text())
    assert [row["objective"] for row in report["rows"]] == ["ar", "mdlm"]
    for entry in report["rows"]:
        run_dir = Path(entry["run"])
        assert {"gen_ppl", "gen_entropy"} <= {m["name"] for m in entry["metrics"]}
        packed = json.loads((run_dir / "pack.json").read_text())
        assert entry["pack"]["artifact_bytes"] == packed["artifact_bytes"] \
            == Path(packed["artifact"]).stat().st_size
        assert json.loads((run_dir / "run.json").read_text())["distributed"]["world_size"] == 2
        # one process, one thread like each rank (float32 results depend on the thread count)
        single = json.loads(run_lmkit(["eval", str(run_dir), "--max-tokens", "1024", "--json"]))
        got = {m["name"]: m["value"] for m in entry["metrics"]}
        for m in single["metrics"]:
            assert got[m["name"]] == pytest.approx(m["value"], rel=1e-12, abs=0)


@pytest.mark.slow
def test_pack_refuses_a_real_two_rank_torchrun(tmp_path):
    """The refusal through torchrun itself: one error line in all, exit status 1, no file."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = lmkit_argv(["pack", str(tmp_path / "run")], 2,
                      ["--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                       "--rdzv-endpoint", f"localhost:{free_port()}"])
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("Error: `lmkit pack` runs in one process, and torchrun started 2") \
        == 1, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
