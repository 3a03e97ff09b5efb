"""Do the masked metrics' ±2-stderr intervals cover the value they estimate?

For each run and each Monte-Carlo metric, a high-precision reference is computed (many more draws
per sequence, its own seed), then the metric is evaluated with its default draws under ``seeds``
different seeds; the benchmark reports how often ``|value − reference| ≤ 2·stderr`` (the
reference's own small stderr is added in quadrature) and the spread of the values across seeds
against the stderr they reported (a ratio near 1 is an honest stderr).

For two runs scored with the same draws (common random numbers), the paired difference of
their ``nelbo_mc`` is checked the same way against a high-precision paired difference.

    lmkit bench coverage RUN_DIR [RUN_DIR ...] [--seeds 40] [--max-tokens N] [--paired]
    python -m lmkit.core.bench.coverage --tiny DATA_DIR --out DIR   # train tiny mdlm, maskrecon
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from lmkit.core import runs
from lmkit.core.bpb import LN2, Metric
from lmkit.core.device import resolve_device
from lmkit.core.evaluate import make_eval_context
from lmkit.core.masking import MaskedSpec, eval_rows, monte_carlo_nelbo
from lmkit.core.paired import paired_difference
from lmkit.errors import LmkitError

REFERENCE_SEED = 1_000_003


def _nats(m: Metric) -> tuple[float, float]:
    return m.value * LN2 * m.bytes, (m.stderr or 0.0) * LN2 * m.bytes


def _summary(name: str, ref: tuple[float, float], draws: list[tuple[float, float]],
             nbytes: int) -> dict[str, Any]:
    ref_v, ref_se = ref
    hits = sum(abs(v - ref_v) <= 2 * math.hypot(se, ref_se) for v, se in draws)
    values = [v for v, _ in draws]
    rms_se = math.sqrt(statistics.fmean(se * se for _, se in draws))
    to_bpb = 1 / LN2 / nbytes
    return {
        "metric": name, "seeds": len(draws), "covered": hits, "coverage": hits / len(draws),
        "reference_bpb": ref_v * to_bpb, "reference_stderr_bpb": ref_se * to_bpb,
        "mean_bpb": statistics.fmean(values) * to_bpb, "rms_stderr_bpb": rms_se * to_bpb,
        "spread_over_stderr": statistics.stdev(values) / rms_se if rms_se > 0 else math.inf,
    }


def coverage_run(run_dir: str | Path, *, seeds: int = 40, max_tokens: int | None = None,
                 reference_samples: int = 256, estimators: tuple[str, ...] = ("any_order", "time"),
                 device: str = "auto", batch_size: int | None = None) -> dict[str, Any]:
    """Coverage of ``nelbo_mc`` (each estimator) and, for maskrecon, of ``recon_score``."""
    run = runs.load_run(run_dir, device=resolve_device(device))
    model = run.model.eval()
    spec: MaskedSpec = run.objective.spec

    def ctx(seed: int) -> Any:
        return make_eval_context(run, max_tokens=max_tokens, seed=seed, batch_size=batch_size)

    base = ctx(0)
    rows = eval_rows(base.val_tokens, base.seq_len, spec)
    samples = base.options.samples
    out = []
    with torch.no_grad():
        for est in estimators:
            def nelbo(seed: int, k: int, est: str = est) -> Metric:
                return monte_carlo_nelbo(model, ctx(seed), spec, rows, samples=k, steps=None,
                                         seed=seed, name="nelbo_mc", estimator=est)

            ref = nelbo(REFERENCE_SEED, reference_samples)
            draws = [_nats(nelbo(s, samples)) for s in range(seeds)]
            out.append({**_summary(f"nelbo_mc ({est})", _nats(ref), draws, ref.bytes),
                        "samples": samples, "reference_samples": reference_samples})
        if hasattr(run.objective, "recon_score"):
            metrics = [run.objective.recon_score(model, ctx(s)) for s in range(seeds + 32)]
            scores = [_nats(m) for m in metrics]
            extra = [v for v, _ in scores[seeds:]]  # 32 more seeds: the reference is their mean
            ref_v = statistics.fmean(extra)
            ref_se = statistics.stdev(extra) / math.sqrt(len(extra))
            out.append({**_summary("recon_score", (ref_v, ref_se), scores[:seeds],
                                   metrics[0].bytes),
                        "reference_samples": f"mean of {len(extra)} seeds"})
    return {"benchmark": "coverage", "run": str(Path(run_dir).resolve()),
            "objective": run.config.objective, "sequences": len(rows),
            "val_targets": int(base.val_tokens.numel() - 1), "rows": out}


def paired_coverage(run_a: str | Path, run_b: str | Path, *, seeds: int = 40,
                    max_tokens: int | None = None, reference_samples: int = 256,
                    device: str = "auto") -> dict[str, Any]:
    """Coverage of the paired stderr of ``nelbo_mc(a) − nelbo_mc(b)`` under shared draws."""
    dev = resolve_device(device)
    loaded = [runs.load_run(r, device=dev) for r in (run_a, run_b)]

    def ctx(run: runs.Run, seed: int) -> Any:
        return make_eval_context(run, max_tokens=max_tokens, seed=seed)

    base = ctx(loaded[0], 0)
    rows = [eval_rows(ctx(r, 0).val_tokens, base.seq_len, r.objective.spec) for r in loaded]
    if not torch.equal(rows[0].positions, rows[1].positions):
        raise LmkitError(f"{run_a} and {run_b} do not score the same sequences")
    samples = base.options.samples

    def diff(seed: int, k: int) -> dict[str, Any]:
        pair = []
        with torch.no_grad():
            for run, rws in zip(loaded, rows, strict=True):
                m = monte_carlo_nelbo(run.model.eval(), ctx(run, seed), run.objective.spec,
                                      rws, samples=k, steps=None, seed=seed, name="nelbo_mc")
                pair += [m.to_dict(), m.units]
        d = paired_difference(*pair)
        if d is None:
            raise LmkitError(f"{run_a} and {run_b} do not share their Monte-Carlo draws")
        return d

    ref = diff(REFERENCE_SEED, reference_samples)
    draws = [diff(s, samples) for s in range(seeds)]
    to_nats = LN2 * ref["bytes"]
    paired = _summary("nelbo_mc a − b (paired)", (ref["difference"] * to_nats,
                                                  ref["stderr"] * to_nats),
                      [(d["difference"] * to_nats, d["stderr"] * to_nats) for d in draws],
                      ref["bytes"])
    independent = _summary("  same, independent ±", (ref["difference"] * to_nats,
                                                     ref["stderr"] * to_nats),
                           [(d["difference"] * to_nats, d["independent_stderr"] * to_nats)
                            for d in draws], ref["bytes"])
    return {"benchmark": "paired coverage", "runs": [str(Path(r).resolve()) for r in
                                                      (run_a, run_b)],
            "sequences": len(rows[0]), "samples": samples,
            "reference_samples": reference_samples, "rows": [paired, independent]}


def format_paired(result: dict[str, Any]) -> str:
    lines = [f"paired · {' − '.join(result['runs'])} · {result['sequences']} sequences"]
    for r in result["rows"]:
        lines.append(
            f"  {r['metric']:<26} coverage {r['covered']}/{r['seeds']} = {r['coverage']:.0%}"
            f"  reference {r['reference_bpb']:+.5f} ± {r['reference_stderr_bpb']:.5f}"
            f"  mean {r['mean_bpb']:+.5f}  rms stderr {r['rms_stderr_bpb']:.5f}"
            f"  spread/stderr {r['spread_over_stderr']:.2f}")
    return "\n".join(lines)


def train_tiny(data_dir: str | Path, out_dir: str | Path, objective: str,
               steps: int = 40) -> Path:
    """A weakly trained tiny model of ``objective`` (fp32, seq 32) on ``data_dir``."""
    from lmkit.core.config import resolve_config
    from lmkit.core.data import open_data
    from lmkit.core.train import train

    run_dir = Path(out_dir) / f"{objective}-tiny"
    cfg = resolve_config(preset="tiny", flags={"objective": objective, "train.steps": steps,
                                               "data.path": str(data_dir)},
                         sets=["train.seq_len=32", "train.batch_tokens=512",
                               "train.val_tokens=1024", "train.dtype=fp32", "optim.lr=0.01"])
    train(cfg, open_data(data_dir), run_dir)
    return run_dir


def format_rows(result: dict[str, Any]) -> str:
    lines = [f"{result['objective']} · {result['run']} · {result['sequences']} sequences"]
    for r in result["rows"]:
        lines.append(
            f"  {r['metric']:<22} coverage {r['covered']}/{r['seeds']} = {r['coverage']:.0%}"
            f"  reference {r['reference_bpb']:.5f} ± {r['reference_stderr_bpb']:.5f}"
            f"  mean {r['mean_bpb']:.5f}  rms stderr {r['rms_stderr_bpb']:.5f}"
            f"  spread/stderr {r['spread_over_stderr']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="masked-diffusion run directories")
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--reference-samples", type=int, default=256)
    p.add_argument("--tiny", metavar="DATA_DIR", help="first train tiny mdlm and maskrecon runs")
    p.add_argument("--out", default="coverage-runs", help="where --tiny puts its runs")
    p.add_argument("--paired", action="store_true", help="also the paired difference of the "
                   "first two runs")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    run_dirs = list(args.runs)
    if args.tiny:
        run_dirs += [str(train_tiny(args.tiny, args.out, o)) for o in ("mdlm", "maskrecon")]
    for run_dir in run_dirs:
        print(format_rows(coverage_run(run_dir, seeds=args.seeds, max_tokens=args.max_tokens,
                                       reference_samples=args.reference_samples,
                                       device=args.device)), flush=True)
    if args.paired and len(run_dirs) >= 2:
        print(format_paired(paired_coverage(run_dirs[0], run_dirs[1], seeds=args.seeds,
                                            max_tokens=args.max_tokens,
                                            reference_samples=args.reference_samples,
                                            device=args.device)), flush=True)


if __name__ == "__main__":
    main()
