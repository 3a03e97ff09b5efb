"""``lmkit eval``: score a run's latest checkpoint on its validation data, per the JSON contract."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lmkit.core import config as config_mod
from lmkit.core import runs
from lmkit.core.bpb import ByteLUT
from lmkit.core.data import DataSource, load_val_tokens, open_data
from lmkit.core.device import autocast, resolve_device, resolve_dtype
from lmkit.core.train import run_evaluation
from lmkit.protocols import EvalContext


def make_eval_context(
    run: runs.Run,
    model: torch.nn.Module,
    *,
    max_tokens: int | None = None,
    val_tokens: torch.Tensor | None = None,
    options: dict[str, Any] | None = None,
    data_dir: str | Path | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    progress: Any = None,
    purpose: str = "eval",
) -> tuple[EvalContext, DataSource]:
    """The EvalContext ``lmkit eval`` gives the run's objective (also used by tests and tools).

    ``val_tokens`` (a slice of the validation stream) replaces the ``max_tokens`` prefix: benchmarks
    score disjoint blocks to measure how a difference varies across the text.
    """
    dev = next(model.parameters()).device
    cfg = run.config
    # The run's own tokenizer copy: open_data refuses shards whose manifest names another one.
    data = open_data(Path(data_dir or run.meta["data"]["dir"]), run.tokenizer_path)
    precision = resolve_dtype(dtype or cfg.train.dtype, dev)
    eval_options = config_mod.build_options(run.objective.EvalOptions, options or {}, "eval")
    lut = ByteLUT.from_sentencepiece(run.tokenizer_path, size=run.model.padded_vocab).to(dev)
    ctx = EvalContext(
        val_tokens=load_val_tokens(data, max_tokens) if val_tokens is None else val_tokens,
        seq_len=cfg.train.seq_len,
        batch_size=batch_size or max(1, cfg.train.batch_tokens // cfg.train.seq_len),
        device=dev, autocast=autocast(dev, precision), lut=lut, tokens=run.tokens,
        seed=cfg.train.seed if seed is None else seed, purpose=purpose, options=eval_options,
        progress=progress or (lambda done, total: None), precision=precision,
    )
    return ctx, data


def evaluate_run(
    run_dir: str | Path,
    *,
    device: str = "auto",
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate ``run_dir``'s checkpoint and write ``eval.json`` there; return the JSON object."""
    run = runs.load_run(run_dir, device=resolve_device(device))
    result = evaluate_loaded(run, **kwargs)
    runs.write_json(run.path / runs.EVAL_FILE, result)
    return result


def evaluate_loaded(
    run: runs.Run, *, model: torch.nn.Module | None = None, **context: Any
) -> dict[str, Any]:
    """Score ``model`` (default: the run's own) with the run's objective on its validation data.

    ``model`` lets a caller score a modified copy, e.g. the dequantized round trip of an artifact;
    ``context`` are :func:`make_eval_context`'s options (max_tokens, options, seed, ...).
    """
    model = run.model if model is None else model
    ctx, data = make_eval_context(run, model, **context)
    max_tokens = context.get("max_tokens")
    calls = [0]
    hook = model.embed.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    ctx.model_calls = lambda: calls[0]
    t0 = time.perf_counter()
    try:
        metrics = run_evaluation(model, run.objective, ctx)
    finally:
        hook.remove()
    end = (time.perf_counter(), calls[0])
    costs = []
    for (name, t, c), nxt in zip(ctx.marks, [*((t, c) for _, t, c in ctx.marks[1:]), end],
                                 strict=True):
        costs.append({"metric": name, "seconds": round(nxt[0] - t, 3), "model_calls": nxt[1] - c})
    return {
        "run": str(run.path),
        "objective": run.config.objective,
        "checkpoint": {"step": run.state["step"], "tokens": run.state["tokens"]},
        "params": run.meta["model"]["params"],
        "data": {"dir": str(data.dir), "val_targets": int(ctx.val_tokens.numel() - 1),
                 "max_tokens": max_tokens, "tokenizer_sha256": data.tokenizer_sha256},
        "precision": ctx.precision,
        "seed": ctx.seed,
        "seconds": round(end[0] - t0, 3),
        "metrics": [m.to_dict() for m in metrics],
        "costs": costs,
    }
