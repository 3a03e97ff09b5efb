"""Generation metrics: samples judged by an AR run.

The judge's exact NLL of the sampled tokens in bits per byte of their decoded text (``gen_ppl``),
always next to the samples' unigram entropy (``gen_entropy``), since a judge's perplexity alone
rewards repetition; plus model calls (``gen_nfe``) and speed. All are ``kind: score``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmkit.core import runs
from lmkit.core.bpb import BpbMeter, Metric
from lmkit.core.device import resolve_device
from lmkit.core.generate import can_judge, sample_loaded
from lmkit.core.sampling import DEFAULT_DTYPE
from lmkit.core.tokenizer import sha256_file
from lmkit.errors import LmkitError


def check_judge(run_dir: str | Path, judge_run_dir: str | Path) -> None:
    """Refuse a judge that is not a causal next-token run with the run's tokenizer (cheap: reads
    run.json and the tokenizer copies, no weights; call it before a long evaluation)."""
    judge_dir, run_dir = Path(judge_run_dir), Path(run_dir)
    if not run_dir.is_dir():
        raise LmkitError(f"--gen needs a run directory or a packed artifact, not {run_dir}")
    if not (judge_dir / runs.RUN_FILE).is_file():
        raise LmkitError(f"--judge {judge_dir} is not an lmkit run directory "
                         f"({runs.RUN_FILE} is missing); pass an AR run")
    meta = runs.read_run_meta(judge_dir)
    objective = meta.get("objective")
    if not can_judge(objective) or not meta["model"]["config"].get("causal", False):
        raise LmkitError(f"--judge {judge_dir} is a {objective!r} run; the judge must be an AR "
                         f"run (an objective with exact next-token NLL)")
    ours, theirs = run_dir / runs.TOKENIZER_FILE, judge_dir / runs.TOKENIZER_FILE
    if not theirs.is_file() or sha256_file(theirs) != sha256_file(ours):
        raise LmkitError(f"--judge {judge_dir} was trained with another tokenizer than "
                         f"{run_dir} ({theirs} differs from {ours}); judge with an AR run "
                         "trained on the same tokenized data")


def judge_nats(model: torch.nn.Module, seq: torch.Tensor, context: int) -> torch.Tensor:
    """Exact NLL (nats, float32) of ``seq[:, 1:]`` under a causal model, ``[B, N-1]``.

    Sequences longer than the judge's context are scored in sliding windows: each target is
    scored once, with at least ``context // 2`` tokens of context.
    """
    n_targets = seq.size(1) - 1
    out = torch.empty(seq.size(0), n_targets, device=seq.device)
    stride, done = max(1, context // 2), 0
    while done < n_targets:
        end = min(context, n_targets) if done == 0 else min(done + stride, n_targets)
        lo = max(0, end - context)
        logits = model(seq[:, lo:end])
        nats = F.cross_entropy(logits.float().transpose(1, 2), seq[:, lo + 1:end + 1],
                               reduction="none")
        out[:, done:end] = nats[:, done - lo:]
        done = end
    return out


def unigram_entropy(ids: list[int]) -> float:
    """Entropy in bits of the empirical token distribution of ``ids``."""
    if not ids:
        return 0.0
    counts = torch.bincount(torch.tensor(ids)).double()
    p = counts[counts > 0] / len(ids)
    return float(-(p * p.log2()).sum())


def judge_samples(judge: runs.Run, lut: Any, rows: torch.Tensor, prompt_len: int,
                  base: dict[str, Any]) -> tuple[Metric, Metric]:
    """``gen_ppl`` and ``gen_entropy`` of sampled ``rows`` (``[n, prompt_len + L]`` ids, the
    prompt first; only the generated ids are scored) under an AR ``judge``; ``base`` goes into
    both details. ``lut`` is the sampled run's byte LUT (the judge's tokenizer is the same)."""
    rows = rows.to(judge.device)
    P = prompt_len
    with torch.no_grad():
        nats = judge_nats(judge.model, rows, judge.config.train.seq_len)[:, P - 1:]
    targets, prev = rows[:, P:], rows[:, P - 1:-1]
    prev2 = torch.cat([torch.full_like(rows[:, :1], -1), rows], dim=1)[:, P - 1:-2]
    meter = BpbMeter(lut, "gen_ppl", "score", {
        **base, "estimator": "judge's exact NLL of the sampled tokens per LUT byte of their text",
        "note": "a score of the samples, not of a held-out text; read it next to gen_entropy "
                "(repetitive text gets a low gen_ppl)",
    })
    meter.add(nats, targets, prev, prev2=prev2)
    ppl = meter.metric()
    ppl.unit = "bpb"  # a score of the samples, but truly the judge's bits per byte of their text
    ppl.detail["perplexity_per_token"] = math.exp(ppl.value * math.log(2) * ppl.bytes / ppl.tokens)
    generated = rows[:, P:].tolist()
    per_sample = torch.tensor([unigram_entropy(ids) for ids in generated], dtype=torch.float64)
    stderr = float(per_sample.std() / math.sqrt(len(generated))) if len(generated) > 1 else None
    pooled = [i for ids in generated for i in ids]
    entropy = Metric("gen_entropy", "score", float(per_sample.mean()), "bits", stderr, ppl.tokens,
                     ppl.bytes, {**base, "estimator": "unigram entropy of each sample's tokens, "
                                 "mean over samples",
                                 "pooled_entropy_bits": unigram_entropy(pooled),
                                 "distinct_tokens": len(set(pooled))})
    return ppl, entropy


def generation_metrics(run: runs.Run | str | Path, judge: runs.Run | str | Path,
                       sampler: str | None = None, *, model: torch.nn.Module | None = None,
                       device: str = "auto", log: Callable[[str], None] | None = None,
                       **request: Any) -> list[Metric]:
    """Generative perplexity (bpb under the judge), unigram entropy, NFE and tokens/s.

    All four are ``kind: score`` and are computed over the same samples (generated ids only; the
    prompt is context). ``run`` and ``judge`` are runs or run directories; ``request`` are
    :class:`~lmkit.core.generate.SampleRequest`'s fields; ``model`` replaces the run's own (an
    artifact's round trip).
    """
    if not isinstance(run, runs.Run):
        run = runs.load_run(run, resolve_device(device))
    check_judge(run.path, judge.path if isinstance(judge, runs.Run) else judge)
    if not isinstance(judge, runs.Run):
        judge = runs.load_run(judge, run.device)
    dev = run.device
    samples = sample_loaded(run, sampler, model=model, **request)
    seed = samples[0]["seed"]
    if log:
        log(f"sampled {len(samples)} × {len(samples[0]['token_ids'])} tokens with "
            f"{samples[0]['sampler']}; judging with {judge.path}")
    rows = torch.tensor([s["prompt_ids"] + s["token_ids"] for s in samples], device=dev)
    base = {"sampler": samples[0]["sampler"], "samples": len(samples),
            "length": len(samples[0]["token_ids"]), "prompt_tokens": len(samples[0]["prompt_ids"]),
            "seed": seed, "steps": samples[0]["detail"].get("steps"),
            "temperature": request.get("temperature", 1.0), "judge": str(judge.path),
            "sampling_dtype": str(DEFAULT_DTYPE).replace("torch.", "")}
    ppl, entropy = judge_samples(judge, run.lut, rows, len(samples[0]["prompt_ids"]), base)
    n_tokens, n_bytes = ppl.tokens, ppl.bytes
    seconds = sum(s["seconds"] for s in samples)
    nfe = Metric("gen_nfe", "score", float(sum(s["nfe"] for s in samples) / len(samples)),
                 "calls", None, n_tokens, n_bytes,
                 {**base, "estimator": "model calls per sample (of its batch)"})
    speed = Metric("gen_tokens_per_s", "score", n_tokens / seconds if seconds else math.inf,
                   "tokens/s", None, n_tokens, n_bytes,
                   {**base, "estimator": "generated tokens / sampling wall time",
                    "device": str(dev), "seconds": seconds})
    return [ppl, entropy, nfe, speed]


def add_generation_metrics(result: dict[str, Any], judge_run_dir: str | Path, *,
                           sampler: str | None = None, device: str = "auto",
                           **request: Any) -> dict[str, Any]:
    """Append the generation metrics to an ``lmkit eval`` result (its ``run`` names the run
    directory; an ``artifact`` entry means its round trip is sampled); return the result. The
    caller keeps it (``lmkit eval`` under its protocol, ``lmkit compare`` in its report)."""
    from lmkit.core.evaluate import load_target

    target = (result.get("artifact") or {}).get("path") or result["run"]
    run, model, _ = load_target(target, device)
    if request.get("seed") is None:
        request["seed"] = 0
    metrics = generation_metrics(run, judge_run_dir, sampler, model=model, **request)
    result["metrics"] = [*result["metrics"], *(m.to_dict() for m in metrics)]
    return result
