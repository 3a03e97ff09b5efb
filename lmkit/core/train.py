"""The training loop, top to bottom: build, (resume), step, log, validate, checkpoint.

Core knows no objective by name: it asks the registry for the class named in the config and
calls its ``loss`` and ``evaluate``. Resuming restores model, optimizers, RNG, the loader's
position and the open log window, so a resumed run follows the uninterrupted one step for step
and logs the same records.

Crash safety: checkpoints every ``train.ckpt_seconds`` (and ``train.ckpt_every`` steps) and on
SIGINT/SIGTERM; one process per run directory (:mod:`lmkit.core.runlock`); a non-finite loss or
gradient norm stops the run before anything damaged is saved. ``python -m
lmkit.core.bench.killtest`` SIGKILLs a run at random moments and checks it still ends bitwise
equal to the uninterrupted run.

Wall-clock runs: with ``train.time`` each step is scheduled at the fraction of the cap where it is
predicted to end, so the last step runs at the LR floor (:mod:`lmkit.core.plan`); the clock counts
training steps only (validation has its own, ``val_seconds``); ``train.prime_steps`` warm up
before it starts and are undone (:mod:`lmkit.core.prime`). ``train.ema`` keeps an fp32 average of
the weights that validation (and eval, pack, sample) score (:mod:`lmkit.core.ema`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from lmkit.core import atomic, distributed, runs
from lmkit.core import config as config_mod
from lmkit.core.build import Setup, batch_geometry, build, check_declared
from lmkit.core.checkpoint import load_checkpoint, read_ema, save_checkpoint
from lmkit.core.config import RunConfig
from lmkit.core.data import DataSource, RotatingLoader, load_val_tokens
from lmkit.core.device import compiler_missing, cpu_emulates_bf16, to_device
from lmkit.core.ema import WeightEMA, ema_weights
from lmkit.core.evaluate import run_evaluation
from lmkit.core.loggers import Loggers, open_run_loggers
from lmkit.core.optim import build_optimizers, set_schedule
from lmkit.core.perf import measure_peak_flops
from lmkit.core.plan import (  # noqa: F401  (Budget, lr_multiplier: re-exported)
    Budget,
    Pace,
    lr_multiplier,
    scheduled_end,
)
from lmkit.core.prime import prime
from lmkit.core.runlock import LOCK_FILE, RunLock
from lmkit.core.trunk import count_params, flops_per_token
from lmkit.errors import LmkitError
from lmkit.protocols import Batch


class TrainObserver(Protocol):
    """The human half of logging (the CLI's progress display); JSONL is written by core."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_log(self, record: dict[str, Any]) -> None: ...
    def on_step(self, step: int, progress: float) -> None: ...
    def on_val(self, record: dict[str, Any]) -> None: ...
    def on_end(self, summary: dict[str, Any]) -> None: ...


class NullObserver:
    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_log(self, record: dict[str, Any]) -> None: ...
    def on_step(self, step: int, progress: float) -> None: ...
    def on_val(self, record: dict[str, Any]) -> None: ...
    def on_end(self, summary: dict[str, Any]) -> None: ...


def trusted_mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Model FLOP/s over the matmul peak measured at start-up, or None where that peak cannot
    be trusted: none measured, or a ratio above 1 (the peak was measured under other
    conditions, e.g. while a shared CPU was busy)."""
    if not peak:
        return None
    mfu = flops_per_s / peak
    return mfu if 0 <= mfu <= 1 else None


@dataclass
class StepStats:
    """One optimizer step: mean loss, mean of the objective's loss metrics, real tokens, and the
    gradient norm before clipping (what divergence is judged on)."""

    loss: float
    metrics: dict[str, float]
    tokens: int
    grad_norm: float | None = None


def _grad_norm(model: torch.nn.Module, grad_clip: float) -> torch.Tensor | None:
    """The total gradient norm, clipped when ``grad_clip > 0`` (clipping computes it anyway).

    Without clipping the norm is still computed (one fused pass over the gradients, no sync):
    a non-finite gradient with a finite loss would otherwise poison the weights unseen.
    """
    if grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def train_step(setup: Setup, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
               loader: RotatingLoader, accum: int, step: int) -> StepStats:
    """One optimizer step over ``accum`` micro-batches (per rank: the step's global batch is
    ``accum * world_size``; see :mod:`lmkit.core.distributed`)."""
    loss_sum = torch.zeros((), device=setup.device)
    metric_sums: dict[str, float] = {}
    tokens = 0
    for i in range(accum):
        batch = Batch(tokens=to_device(loader.next_batch(), setup.device), step=step)
        distributed.seed_micro_batch(setup.cfg.train.seed, step, distributed.micro_index(i))
        with setup.autocast():
            out = setup.objective.loss(model, batch)
        (out.loss / accum).backward()
        loss_sum += out.loss.detach().float()
        for key, value in out.metrics.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
        tokens += batch.tokens[:, 1:].numel() if out.tokens is None else int(out.tokens)
    loss_sum, metric_sums, tokens = distributed.sum_step_stats(loss_sum, metric_sums, tokens)
    distributed.sum_gradients(setup.model)
    norm = _grad_norm(setup.model, setup.cfg.optim.grad_clip)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    # one sync per step keeps the clock honest; the grad norm rides along in the same transfer
    if norm is None:
        loss, grad_norm = float(loss_sum), None
    else:
        loss, grad_norm = torch.stack([loss_sum, norm.detach().float()]).tolist()
    total = accum * distributed.world_size()
    return StepStats(loss / total, {k: v / total for k, v in metric_sums.items()}, tokens,
                     grad_norm)


class TrainingInterrupted(LmkitError):
    """SIGINT/SIGTERM stopped training after a step, with a checkpoint saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop at the end of the current step, checkpointed;
    a second signal aborts at once (the last checkpoint stays intact). The previous handlers are
    restored on exit. Outside the main thread signals cannot be caught, so nothing is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            self.restore()
            raise KeyboardInterrupt
        self.received = signum

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


@dataclass
class LogWindow:
    """The steps since the last train record; checkpointed, so a resumed run logs the same
    averages as the uninterrupted one."""

    tokens: int = 0
    loss: float = 0.0
    n: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0  # the window's training seconds (what its tok/s divides by)

    def add(self, stats: StepStats, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.loss += stats.loss
        for key, value in stats.metrics.items():
            self.metrics[key] = self.metrics.get(key, 0.0) + value
        self.n += 1


def _write_run_files(run_dir: Path, setup: Setup, data: DataSource) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / runs.CONFIG_FILE, config_mod.to_toml(setup.cfg))
    atomic.write_bytes(run_dir / runs.TOKENIZER_FILE, setup.tokenizer.path.read_bytes())
    runs.write_val_copy(run_dir, data)
    atomic.write_json(run_dir / runs.RUN_FILE, {
        "format": "lmkit-run/1",
        "objective": setup.cfg.objective,
        "config": config_mod.to_dict(setup.cfg),
        "model": runs.model_meta(setup.model.cfg, setup.model),
        "tokens": {"vocab_size": setup.tokens.vocab_size, "bos_id": setup.tokens.bos_id,
                   "special": dict(setup.tokens.special)},
        "data": data.describe(),
        "environment": runs.environment(setup.device),
        "distributed": distributed.describe(),
        "precision": setup.precision,
    })


def train(
    cfg: RunConfig,
    data: DataSource,
    run_dir: Path,
    *,
    resume: bool = False,
    restart: bool = False,
    observer: TrainObserver | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on ``data`` into ``run_dir``; return a summary (also logged).

    ``resume`` continues from the run's checkpoint; ``restart`` starts a run that stopped before
    its first checkpoint again from step 0 (its log reset). The run directory is locked for the
    duration (:mod:`lmkit.core.runlock`); SIGINT/SIGTERM stop after the current step with a
    checkpoint (:class:`TrainingInterrupted`); a non-finite loss or gradient norm stops at once
    without checkpointing the damaged weights.
    """
    run_dir = Path(run_dir)

    def claim(stack: contextlib.ExitStack) -> None:
        stack.enter_context(RunLock(run_dir))
        if not (resume or restart) and any(not p.name.startswith(LOCK_FILE)
                                           for p in run_dir.iterdir()):
            raise LmkitError(
                f"{run_dir} already exists and is not empty; pass --resume auto to continue it "
                f"or choose another --out"
            )

    with contextlib.ExitStack() as stack:
        def claim_and_open() -> Loggers:  # under torchrun rank 0 holds the lock and the loggers
            claim(stack)
            return stack.enter_context(open_run_loggers(cfg, run_dir, resume))  # train.log

        loggers = distributed.on_main(claim_and_open) or Loggers()
        stop = stack.enter_context(StopSignals())
        if not distributed.is_main():
            observer = None
        return _train(cfg, data, run_dir, resume=resume, restart=restart,
                      observer=observer or NullObserver(), stop=stop, loggers=loggers)


def _train(cfg: RunConfig, data: DataSource, run_dir: Path, *, resume: bool, restart: bool,
           observer: TrainObserver, stop: StopSignals,
           loggers: Loggers | None = None) -> dict[str, Any]:
    t = cfg.train
    setup = build(cfg, data)
    model, objective, device = setup.model, setup.objective, setup.device
    optimizers = build_optimizers(model, cfg.optim)
    micro, accum, tokens_per_step = batch_geometry(cfg)
    local_accum = distributed.split_accum(accum)
    loader = setup.loader(micro, rank=distributed.rank(), world_size=distributed.world_size())
    val_tokens = load_val_tokens(data, t.val_tokens or None)
    budget = Budget(t.steps, t.tokens, t.time)
    log = distributed.main_only(runs.MetricsLog(run_dir / runs.METRICS_FILE, loggers),
                                "write", "reset", "truncate_after")

    step, tokens_seen, train_seconds, trained_tokens = 0, 0, 0.0, 0
    val_seconds = 0.0  # validation's wall clock, kept apart from the training clock
    window = LogWindow()
    ckpt_step: int | None = None
    ema = WeightEMA(model, t.ema) if t.ema > 0 else None
    if resume:
        state = load_checkpoint(run_dir, model, optimizers)
        step, tokens_seen, train_seconds = state["step"], state["tokens"], state["seconds"]
        trained_tokens = int(state.get("trained_tokens", tokens_seen))
        val_seconds = float(state.get("val_seconds", 0.0))
        if ema is not None:
            saved = read_ema(run_dir)
            if saved is None:
                raise LmkitError(f"{run_dir}: train.ema={t.ema} but the checkpoint holds no "
                                 "weight average (ema.safetensors); the checkpoint is damaged")
            ema.load_state_dict(saved, f"{run_dir} ema.safetensors")
        loader.load_state_dict(state["loader"])
        if isinstance(state.get("log_window"), dict):
            window = LogWindow(**state["log_window"])
        ckpt_step = step
        log.truncate_after(step)
    elif restart:
        log.reset()
    if distributed.is_main():
        _write_run_files(run_dir, setup, data)
    start_step = step

    if t.compile:
        missing = compiler_missing(device)
        if missing is None and setup.precision == "bf16" and cpu_emulates_bf16(device):
            # see kernels.linear
            missing = ("this CPU has no bf16 instructions (lmkit's bf16 GEMMs run in float32 "
                       "there; compiled blocks would turn them back into slower bf16 ones)")
        if missing is None:
            model.compile_training()
        else:
            warnings.warn(f"lmkit: train.compile is on but {missing}: training runs eager",
                          stacklevel=1)
    # The time budget's clock: where the last step was scheduled to end (lmkit.core.plan), so
    # the step that reaches the cap runs at the schedule's floor and is the last.
    clock_seconds = float(state.get("clock_seconds", train_seconds)) if resume else train_seconds
    to_train = budget.progress(step, tokens_seen, clock_seconds) < 1.0
    n_params = count_params(model)
    flops_tok = flops_per_token(model.cfg, n_params, t.seq_len, data.vocab_size)
    peak = measure_peak_flops(device, setup.precision)
    info = {
        "run_dir": str(run_dir), "objective": cfg.objective, "preset": cfg.preset,
        "params": n_params, "device": str(device), "precision": setup.precision,
        "tokens_per_step": tokens_per_step, "accum": accum, "budget": dataclasses.asdict(budget),
        "world_size": distributed.world_size(),
        "resumed_at": step if resume else None, "peak_flops": peak,
        "prime_steps": t.prime_steps if to_train else 0, "compiled": model.compiled_training,
        "weights": "raw" if ema is None else "ema",
    }
    observer.on_start(info)
    prime_seconds = prime(info["prime_steps"],
                          lambda i: train_step(setup, model, optimizers, loader, local_accum,
                                               step + i),
                          model, optimizers, loader)

    def validate() -> list[dict[str, Any]]:
        nonlocal val_seconds
        v0 = time.perf_counter()
        ctx = setup.eval_context(val_tokens, purpose="validation")
        with ema_weights(ema):
            metrics = [m.to_dict() for m in run_evaluation(model, objective, ctx)]
        val_seconds += time.perf_counter() - v0
        record = {"type": "val", "step": step, "tokens": tokens_seen,
                  "seconds": train_seconds, "train_seconds": train_seconds,
                  "val_seconds": round(val_seconds, 3),
                  "weights": "raw" if ema is None else "ema", "metrics": metrics}
        log.write(record)
        observer.on_val(record)
        return metrics

    def checkpoint() -> None:
        nonlocal ckpt_step, last_ckpt
        if distributed.is_main():  # every rank holds the same state
            average = {} if ema is None else {"ema": ema.state_dict()}
            save_checkpoint(run_dir, model, optimizers, {
                "step": step, "tokens": tokens_seen, "seconds": train_seconds,
                "trained_tokens": trained_tokens, "loader": loader.state_dict(),
                "log_window": dataclasses.asdict(window), "val_seconds": val_seconds,
                "clock_seconds": clock_seconds,
            }, **average)
        ckpt_step, last_ckpt = step, time.perf_counter()

    model.train()
    last_ckpt = time.perf_counter()
    last_val: list[dict[str, Any]] = []
    pace = Pace()  # recent step times: how far the next step moves the clock
    while budget.progress(step, tokens_seen, clock_seconds) < 1.0:
        t0 = time.perf_counter()
        scheduled = scheduled_end(budget, train_seconds, pace)  # where this step should end
        progress = budget.progress(step, tokens_seen, scheduled)
        mult = lr_multiplier(step, progress, t.warmup_steps, t.warmdown_frac)
        set_schedule(optimizers, cfg.optim, step, mult)
        stats = train_step(setup, model, optimizers, loader, local_accum, step)
        if not (math.isfinite(stats.loss)
                and (stats.grad_norm is None or math.isfinite(stats.grad_norm))):
            kept = (f"the last good checkpoint (step {ckpt_step}) is kept in {run_dir}"
                    if ckpt_step is not None else "no checkpoint was written")
            raise LmkitError(
                f"training diverged at step {step + 1}: loss {stats.loss}, gradient norm "
                f"{stats.grad_norm}; {kept}. Lower optim.lr (now {cfg.optim.lr}) or set "
                f"optim.grad_clip, then train again")
        if step == 0:
            check_declared(objective, model)  # a module created inside loss() is an error too
        step += 1
        tokens_seen += tokens_per_step
        trained_tokens += stats.tokens
        if ema is not None:
            ema.update(step - 1)
        # Every rank takes rank 0's step time, so the clock, the pace and the schedule (hence
        # the learning rate and the stopping step) are the same on all of them.
        step_seconds, stopping = distributed.agree_step(time.perf_counter() - t0,
                                                        stop.received is not None)
        window.add(stats, tokens_per_step, step_seconds)
        train_seconds += step_seconds
        pace.add(step_seconds)
        clock_seconds = scheduled

        done = budget.progress(step, tokens_seen, clock_seconds) >= 1.0
        observer.on_step(step, min(budget.progress(step, tokens_seen, clock_seconds), 1.0))
        if step % t.log_every == 0 or done or step == 1:
            tok_s = window.tokens / window.seconds if window.seconds > 0 else 0.0
            frac = budget.progress(step, tokens_seen, clock_seconds)
            record = {
                "type": "train", "step": step, "tokens": tokens_seen,
                "seconds": round(train_seconds, 3), "train_seconds": round(train_seconds, 3),
                "val_seconds": round(val_seconds, 3), "clock_seconds": clock_seconds,
                "loss": window.loss / window.n,
                "trained_tokens": trained_tokens,
                "loss_metrics": {k: v / window.n for k, v in window.metrics.items()},
                "lr_mult": mult, "tok_s": tok_s,
                "mfu": trusted_mfu(flops_tok * tok_s, peak),
                "progress": min(frac, 1.0),
                "eta_s": max(0.0, train_seconds * (1 - frac) / frac) if frac > 0 else None,
            }
            log.write(record)
            observer.on_log(record)
            window = LogWindow()
        if t.val_every and step % t.val_every == 0 and not done:
            last_val = validate()
        due = (t.ckpt_every and step % t.ckpt_every == 0) or (
            t.ckpt_seconds and time.perf_counter() - last_ckpt >= t.ckpt_seconds)
        if stopping or (due and not done):
            checkpoint()
        if stopping:
            signum = stop.received or signal.SIGTERM  # under torchrun: another rank's signal
            distributed.barrier()
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved "
                f"in {run_dir}; continue with `lmkit train --resume {run_dir}`", signum)

    previous = log.records() if resume and step == start_step else []
    if previous and previous[-1].get("type") == "val" and previous[-1].get("step") == step:
        last_val = previous[-1]["metrics"]  # finished before: its final validation stands
    else:
        last_val = validate()
        checkpoint()
    distributed.barrier()  # the final checkpoint is on disk before any rank reads it
    summary = {
        "run_dir": str(run_dir), "objective": cfg.objective, "steps": step,
        "tokens": tokens_seen, "trained_tokens": trained_tokens, "seconds": train_seconds,
        "train_seconds": train_seconds, "val_seconds": val_seconds,
        "prime_seconds": prime_seconds, "weights": "raw" if ema is None else "ema",
        "params": n_params,
        "tok_s": tokens_seen / train_seconds if train_seconds else None, "val": last_val,
    }
    observer.on_end(summary)
    return summary
