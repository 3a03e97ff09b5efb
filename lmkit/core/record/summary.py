"""The across-seed half of ``submission.json``: means and stds, the byte count and the
compliance block, each a pure function of the per-seed results (``--check`` recomputes them).

A compliance item is ``true`` or ``false`` only where lmkit computed it from what the folder
holds; ``null`` where it cannot know (no data to check for leaks, a GPU count not recorded).
"""

from __future__ import annotations

import math
from typing import Any

from lmkit.core.defaults import DEFAULT_CAP_BYTES
from lmkit.core.stats import mean_std

TIME_LIMIT_S = 600.0  # parameter-golf's training and evaluation limits, each (on 8xH100)
REQUIRED_SEEDS = 3
SUMMARY_FIELDS = ("val_bpb", "pre_quant_val_bpb", "quantized_val_bpb", "quantization_penalty",
                  "artifact_bytes", "bytes_total", "steps", "train_wallclock_ms", "eval_time_s",
                  "val_tokens")


def summarize(seeds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per field: n, mean, sample std (null below 2 seeds), min and max across the seeds
    (all null where a seed's value is null)."""
    out = {}
    for key in SUMMARY_FIELDS:
        values = [s.get(key) for s in seeds]
        if not values or any(not isinstance(v, (int, float)) or isinstance(v, bool)
                             or not math.isfinite(v) for v in values):
            out[key] = {"n": len(values), "mean": None, "std": None, "min": None, "max": None}
            continue
        mean, std = mean_std([float(v) for v in values])
        out[key] = {"n": len(values), "mean": mean, "std": std, "min": min(values),
                    "max": max(values)}
    return out


def all_of(values: list[bool | None]) -> bool | None:
    """False if any is false; else null if any is unknown; else true (none: unknown)."""
    if any(v is False for v in values):
        return False
    if not values or any(v is None for v in values):
        return None
    return True


def leak_verdict(report: dict[str, Any] | None) -> bool | None:
    """No validation document in training: from ``lmkit data check`` on the run's data; null
    when the data was not there or its files disagree with its manifest."""
    if report is None:
        return None
    if report.get("leak"):
        return False
    return True if report.get("ok") else None


def on_8xh100(env: dict[str, Any]) -> bool | None:
    """Whether a seed was trained on 8 H100s, from its run.json environment. This lmkit trains in
    one process, so a run without a recorded ``world_size`` used one device."""
    if env.get("device", "").split(":")[0] != "cuda":
        return False
    if "H100" not in str(env.get("gpu") or ""):
        return False if env.get("gpu") else None
    count = env.get("world_size", 1)
    return count == 8 if isinstance(count, int) else None


COMPLIANCE_NOTES = {
    "artifact_under_16mb": "every seed's bytes_total (its artifact + the counted code) <= "
                           "16,000,000 decimal bytes",
    "bytes_under_cap": "every seed's bytes_total <= bytes_cap (the cap the artifacts were "
                       "packed to)",
    "train_under_600s_strict": "every seed's logged training seconds (the last training record "
                               "of its log: optimizer steps only) < 600, on train_hardware",
    "eval_under_600s": "every seed's eval_time_s (reading the artifact and scoring the "
                       "validation set) < 600, on eval_hardware",
    "timed_on_8xh100": "every seed was trained on 8 H100 GPUs (the hardware the 600 s limits "
                       "are stated for), from its run.json environment",
    "three_seeds": "at least 3 seeds",
    "full_validation_targets": "every seed's evaluation ran over the whole validation stream "
                               "(eval_targets == target_tokens)",
    "val_tokens_equal_target_tokens": "the headline metric scored every validation target "
                                      "(val_tokens == target_tokens)",
    "no_validation_training_leak": "lmkit data check on each run's data found no validation "
                                   "document in training (null: the data is not available)",
}


def compliance(seeds: list[dict[str, Any]], cap_bytes: int) -> dict[str, bool | None]:
    """The compliance block, each item computed from the seeds' figures."""
    return {
        "artifact_under_16mb": all_of([s["bytes_total"] <= DEFAULT_CAP_BYTES for s in seeds]),
        "bytes_under_cap": all_of([s["bytes_total"] <= cap_bytes for s in seeds]),
        "train_under_600s_strict": all_of([s["train_seconds"] < TIME_LIMIT_S for s in seeds]),
        "eval_under_600s": all_of([s["eval_time_s"] < TIME_LIMIT_S for s in seeds]),
        "timed_on_8xh100": all_of([on_8xh100(s["train_environment"]) for s in seeds]),
        "three_seeds": len({s["seed"] for s in seeds}) >= REQUIRED_SEEDS,
        "full_validation_targets": all_of([s["eval_targets"] == s["target_tokens"]
                                           for s in seeds]),
        "val_tokens_equal_target_tokens": all_of([s["val_tokens"] == s["target_tokens"]
                                                  for s in seeds]),
        "no_validation_training_leak": all_of([leak_verdict(s["leak_check"]) for s in seeds]),
    }


def byte_count(seeds: list[dict[str, Any]], code_paths: list[str], code_bytes: int
               ) -> dict[str, Any]:
    """``bytes_total`` (the largest seed's: the cap binds every seed) and what it counts."""
    worst = max(seeds, key=lambda s: s["bytes_total"])
    return {"bytes_total": worst["bytes_total"], "code_bytes": code_bytes,
            "bytes_counted": [worst["artifact"], *code_paths],
            "bytes_note": f"decimal bytes on disk of bytes_counted: seed {worst['seed']}'s "
                          "artifact (the largest bytes_total of the seeds) and every file under "
                          "code/ (the Python source of lmkit and of the objective's package)"}
