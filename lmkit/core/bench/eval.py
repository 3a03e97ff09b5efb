"""``lmkit bench eval``: seconds and model calls of each estimator of a run's evaluation."""

from __future__ import annotations

from typing import Any

import torch

from lmkit.core.evaluate import evaluate_run


def bench_eval(run_dir: str, *, max_tokens: int | None = None,
               options: dict[str, Any] | None = None, device: str = "auto") -> dict[str, Any]:
    """Cost of each estimator of a run's evaluation: seconds and model calls per 1M tokens."""
    result = evaluate_run(run_dir, max_tokens=max_tokens, options=options, device=device,
                          latest=False)
    by_name = {m["name"]: m for m in result["metrics"]}
    rows = []
    for cost in result["costs"]:
        m = by_name[cost["metric"]]
        per_m = 1e6 / m["tokens"]
        rows.append({
            "metric": m["name"], "kind": m["kind"], "value": m["value"], "stderr": m["stderr"],
            "tokens": m["tokens"], "seconds": cost["seconds"], "model_calls": cost["model_calls"],
            "seconds_per_1m_tokens": cost["seconds"] * per_m,
            "model_calls_per_1m_tokens": cost["model_calls"] * per_m,
        })
    return {"benchmark": "eval", "run": result["run"], "objective": result["objective"],
            "precision": result["precision"], "threads": torch.get_num_threads(), "rows": rows}
