"""``lmkit bench eval``: seconds and model calls of each estimator of a run's evaluation."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from lmkit.core import runs
from lmkit.core.device import resolve_device
from lmkit.core.evaluate import evaluate_stored


def bench_eval(run_dir: str, *, max_tokens: int | None = None,
               options: dict[str, Any] | None = None, device: str = "auto",
               repeats: int = 1) -> dict[str, Any]:
    """Cost of each estimator of a run's evaluation: seconds and model calls per 1M tokens.

    With ``repeats`` > 1 the evaluation runs that many times in a row (the same seed, so the
    same figures) and each estimator's seconds are the median, with every repeat's listed in
    ``seconds_rounds``: one pass of a small run takes a second or two, which load from other
    processes on a shared CPU can stretch by a third."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    run = runs.load_run(run_dir, device=resolve_device(device))  # loaded once for every repeat
    results = [evaluate_stored(run, latest=False, max_tokens=max_tokens, options=options)
               for _ in range(repeats)]
    result = results[0]
    by_name = {m["name"]: m for m in result["metrics"]}
    rows = []
    for i, cost in enumerate(result["costs"]):
        m = by_name[cost["metric"]]
        per_m = 1e6 / m["tokens"]
        rounds = [r["costs"][i]["seconds"] for r in results]
        seconds = statistics.median(rounds)
        rows.append({
            "metric": m["name"], "kind": m["kind"], "value": m["value"], "stderr": m["stderr"],
            "tokens": m["tokens"], "seconds": seconds, "seconds_rounds": rounds,
            "model_calls": cost["model_calls"],
            "seconds_per_1m_tokens": seconds * per_m,
            "model_calls_per_1m_tokens": cost["model_calls"] * per_m,
        })
    return {"benchmark": "eval", "run": result["run"], "objective": result["objective"],
            "precision": result["precision"], "threads": torch.get_num_threads(),
            "repeats": repeats, "rows": rows}
