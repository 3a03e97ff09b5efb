"""``lmkit bench all``: the train, eval and sample benches in one process, with the few ratios
that say whether lmkit is faster than the scripts it replaces.

It trains what it needs itself: a short AR run (into a temporary directory) for the evaluation
bench; the sampling bench uses freshly initialised models (speed does not depend on weights).
Sized to finish in a few minutes on a 2-core CPU: one step per round, fewer tokens per step
than the preset for the training bench (the model's shape is the preset's).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmkit.core.bench.eval import bench_eval
from lmkit.core.bench.sample import bench_sample
from lmkit.core.bench.train import bench_train
from lmkit.core.config import resolve_config
from lmkit.core.data import open_for_training
from lmkit.core.defaults import DEFAULT_NUM_SAMPLES
from lmkit.core.memory import peak_rss_bytes
from lmkit.core.train import train

# interleaved rounds of the sample bench: with one, the samplers would run in a fixed order and
# a machine slowing down over the bench would show as the later ones being slower (ddpm_cache
# read 0.79x and 0.82x ddpm that way on an AVX2 EPYC, about 1.0x interleaved, with fewer calls)
SAMPLE_ROUNDS = 2
# evaluations of the AR run, the median kept: one pass over 32,768 tokens takes about 1.3 s on
# a 2-core CPU, and a single one read 18.9k and 26.8k tokens/s in two bench runs an hour apart
EVAL_ROUNDS = 3


def _row(result: dict[str, Any], precision: str, model: str) -> dict[str, Any]:
    return next(r for r in result["rows"] if r["precision"] == precision and r["model"] == model)


def _sample_row(group: dict[str, Any], label: str) -> dict[str, Any] | None:
    return next((r for r in group["rows"] if r["label"] == label), None)


def bench_all(*, preset: str = "small", rounds: int = 3, batch_tokens: int = 2048,
              train_steps: int = 8, eval_tokens: int = 32768, length: int = 256,
              masked_length: int | None = None, num: int = DEFAULT_NUM_SAMPLES,
              device: str = "auto", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the three benches; ``summary`` holds lmkit's ratios to the references (model
    FLOP/s), evaluation over training tokens/s, KV-cached over uncached AR sampling and
    ``ddpm_cache`` over ``ddpm``, each computed from the rows beside it. ``wall_seconds`` and
    ``peak_rss_bytes`` (this process's peak resident set) are what the whole bench cost.

    AR samples ``length`` tokens; the masked samplers ``masked_length`` (default: half of it)
    in as many steps: each of their steps is a forward pass over the whole sequence, so their
    cost grows with the square of the length (six samplers at 256 took 84 s of a 4-minute bench
    on a 2-core CPU). Every sampler draws ``num`` samples at once, `lmkit sample`'s default:
    the KV cache's gain depends on it (decoding a couple of rows is bound by per-operation
    overhead, uncached decoding by arithmetic)."""
    t0 = time.perf_counter()
    say = log or (lambda _: None)
    say("train bench: lmkit against the references, fp32 and bf16 …")
    # eager lmkit only: compiling two more contenders would double this bench's time
    # (`lmkit bench train` races the compiled one too)
    train_result = bench_train(preset=preset, steps=1, rounds=rounds, warmup=1,
                               batch_tokens=batch_tokens, compiled=False, device=device, log=log)
    with tempfile.TemporaryDirectory(prefix="lmkit-bench-") as tmp:
        run_dir = Path(tmp) / "ar"
        say(f"training a {train_steps}-step AR run for the evaluation bench …")
        cfg = resolve_config(preset=preset, flags={"objective": "ar", "train.device": device,
                                                   "train.steps": train_steps,
                                                   "train.val_tokens": eval_tokens,
                                                   "train.val_every": 0})
        run = train(cfg, open_for_training(cfg.data), run_dir)
        say("eval bench …")
        eval_result = bench_eval(str(run_dir), max_tokens=eval_tokens, device=device,
                                 repeats=EVAL_ROUNDS)
    say("sample bench: ar and mdlm samplers …")
    sample_result = bench_sample(["ar"], preset=preset, num=num, length=length, steps=length,
                                 repeats=SAMPLE_ROUNDS, device=device, log=log)
    masked = masked_length or max(1, length // 2)
    sample_result["groups"] += bench_sample(["mdlm"], preset=preset, num=num, length=masked,
                                            steps=masked, repeats=SAMPLE_ROUNDS, device=device,
                                            log=log)["groups"]
    train_tok_s = run["tok_s"]
    eval_tok_s = statistics.median(1e6 / r["seconds_per_1m_tokens"] for r in eval_result["rows"])
    summary: dict[str, Any] = {"train_run_tok_s": train_tok_s, "eval_tok_s": eval_tok_s,
                               "eval_over_train_tok_s": eval_tok_s / train_tok_s}
    for p in {r["precision"] for r in train_result["rows"]}:
        for ref in ("reference_a", "reference_b"):
            summary[f"lmkit_over_{ref}_flops_s_{p}"] = \
                _row(train_result, p, ref)["lmkit_over_this_flops_s"]
    for group in sample_result["groups"]:
        pairs = {"ar": ("ar (kv cache)", "ar (no cache)"), "mdlm": ("ddpm_cache", "ddpm")}
        if group["objective"] in pairs:
            fast, slow = (_sample_row(group, label) for label in pairs[group["objective"]])
            if fast and slow:
                summary[f"{fast['label']} over {slow['label']} tokens/s"] = \
                    fast["tokens_per_s"] / slow["tokens_per_s"]
    return {"benchmark": "all", "preset": preset, "wall_seconds": time.perf_counter() - t0,
            "peak_rss_bytes": peak_rss_bytes(),
            "summary": summary, "train": train_result, "eval": eval_result,
            "train_run": {k: run[k] for k in ("steps", "tokens", "seconds", "tok_s")},
            "sample": sample_result}
