"""``lmkit bench train``: lmkit's training step against two plain references, side by side.

In one process, on the same batches, with the same AdamW, lmkit's :func:`train_step` races
:class:`~lmkit.core.bench.reference.BaselineGPT` (the same architecture, written plainly) and
:class:`~lmkit.core.bench.reference.PlainGPT` (a GPT-2-style stack of the same width and depth),
in fp32 and bf16 autocast. lmkit runs as its config says (the preset's micro-batches; compiled
blocks as a separate contender); the references run the whole step in one forward, as the
scripts they stand for do. Rounds are interleaved (every contender runs a few steps in turn,
the order rotating each round) and medians are reported, so load from other processes on a
shared machine hits every contender alike. The matmul peak is measured once per round too,
and its spread is reported, because it drifts as much as the throughput does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from lmkit.core.bench.reference import BaselineGPT, PlainGPT, model_flops_per_token
from lmkit.core.build import batch_geometry, build
from lmkit.core.config import resolve_config
from lmkit.core.data import open_for_training
from lmkit.core.device import autocast, cpu_emulates_bf16, synchronize
from lmkit.core.optim import adamw, build_optimizers
from lmkit.core.perf import matmul_flops
from lmkit.core.train import train_step, trusted_mfu
from lmkit.core.trunk import count_params, flops_per_token

CONTENDERS = ("lmkit", "reference_a", "reference_b")
DESCRIPTIONS = {
    "lmkit": "lmkit train_step (the trunk under the objective)",
    "lmkit_compiled": "lmkit train_step with the trunk's blocks torch.compile-d (train.compile)",
    "reference_a": "plain parameter-golf baseline GPT (same architecture)",
    "reference_b": "plain GPT-2 style (LayerNorm, GELU MLP 4x, learned positions)",
}


_EMULATED_BF16_NOTE = (
    "this CPU has no bf16 instructions: lmkit's trunk computes each bf16 GEMM as a float32 GEMM "
    "of the bf16-rounded operands (the same value as a bf16 GEMM with float32 sums; its compiled "
    "blocks run eager there), the references take PyTorch's emulated bf16 GEMM, so the bf16 "
    "ratios measure that choice rather than lmkit's overhead; fp32 is faster than either here")


def bf16_note(device: torch.device, precisions: tuple[str, ...]) -> str | None:
    """What the bf16 rows measure where that needs saying (a CPU without bf16 instructions)."""
    return _EMULATED_BF16_NOTE if "bf16" in precisions and cpu_emulates_bf16(device) else None


def _reference_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loader: Any,
                    device: torch.device, ctx: Callable[[], Any]) -> None:
    """The plain script's step: forward to a loss, backward, AdamW step, zero the grads."""
    tokens = loader.next_batch().to(device)
    with ctx():
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    float(loss.detach())  # one sync per step, as lmkit's train_step does


def _contenders(cfg: Any, data: Any, precision: str, compiled: bool
                ) -> dict[str, dict[str, Any]]:
    """Each contender: a ``step()`` callable, its parameter count and its model FLOPs/token."""
    cfg.train.dtype = precision
    setup = build(cfg, data)
    optimizers = build_optimizers(setup.model, cfg.optim)
    micro, accum, _ = batch_geometry(cfg)
    loader = setup.loader(micro)
    setup.model.train()
    m = setup.model.cfg
    n_params = count_params(setup.model)
    seq = cfg.train.seq_len
    counter = {"step": 0}

    def lmkit_step() -> None:
        train_step(setup, setup.model, optimizers, loader, accum, counter["step"])
        counter["step"] += 1

    out = {"lmkit": {"step": lmkit_step, "params": n_params,
                     "flops_per_token": flops_per_token(m, n_params, seq, data.vocab_size)}}
    vocab = setup.model.padded_vocab
    torch.manual_seed(cfg.train.seed)
    refs = {
        "reference_a": BaselineGPT(vocab, m.n_layer, m.d_model, m.n_head, m.n_kv_head, seq,
                                   m.mlp_mult, m.q_gain_init, m.logit_softcap, m.rope_base,
                                   m.embed_init_std),
        "reference_b": PlainGPT(vocab, m.n_layer, m.d_model, m.n_head, seq),
    }
    ctx = autocast(setup.device, precision)
    for name, model in refs.items():
        model = model.to(setup.device).train()
        opt = adamw([{"params": list(model.parameters()), "lr": cfg.optim.lr}], cfg.optim)
        ref_loader = setup.loader(micro * accum)  # a step's worth of the same stream
        out[name] = {
            "step": (lambda model=model, opt=opt, ld=ref_loader:
                     _reference_step(model, opt, ld, setup.device, ctx)),
            "params": count_params(model),
            "flops_per_token": model_flops_per_token(model, m.n_layer, m.d_model, seq),
        }
    if compiled:
        out["lmkit_compiled"] = _compiled_lmkit(cfg, data, out["lmkit"]["flops_per_token"])
    out["lmkit"]["device"] = setup.device
    return out


def _compiled_lmkit(cfg: Any, data: Any, flops_tok: float) -> dict[str, Any]:
    """lmkit's step on its own trunk with ``train.compile``'s compiled blocks; the first call
    (which compiles, unless this process compiled that block already) is timed apart, as
    ``compile_seconds``."""
    setup = build(cfg, data)
    optimizers = build_optimizers(setup.model, cfg.optim)
    micro, accum, _ = batch_geometry(cfg)
    loader = setup.loader(micro)
    setup.model.train()
    setup.model.compile_training()
    entry: dict[str, Any] = {"params": count_params(setup.model), "flops_per_token": flops_tok}
    t0 = time.perf_counter()
    train_step(setup, setup.model, optimizers, loader, accum, 0)
    synchronize(setup.device)
    entry["compile_seconds"] = time.perf_counter() - t0
    entry["step"] = lambda: train_step(setup, setup.model, optimizers, loader, accum, 1)
    return entry


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_train(
    *,
    preset: str = "small",
    objective: str = "ar",
    steps: int = 1,
    rounds: int = 5,
    warmup: int = 1,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    batch_tokens: int | None = None,
    compiled: bool | None = None,
    data_path: str | None = None,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokens/s, model FLOPs/token, model FLOP/s and MFU of lmkit and both references, with
    every ratio to lmkit, per precision; medians over ``rounds`` interleaved rounds of
    ``steps`` optimizer steps each. ``batch_tokens`` overrides the preset's step size;
    ``compiled`` adds lmkit with compiled blocks as a fourth contender (None: when the preset sets
    ``train.compile``); the ``lmkit`` row is always eager, so its ratios compare like with like."""
    cfg = resolve_config(preset=preset, flags={"objective": objective, "train.device": device,
                                               "train.steps": steps * rounds + warmup,
                                               "train.batch_tokens": batch_tokens,
                                               "data.path": data_path})
    data = open_for_training(cfg.data, log)
    micro, accum, tokens_per_step = batch_geometry(cfg)
    compiled = cfg.train.compile if compiled is None else compiled
    names = CONTENDERS + (("lmkit_compiled",) if compiled else ())
    runs = {p: _contenders(cfg, data, p, compiled) for p in precisions}
    dev = runs[precisions[0]]["lmkit"]["device"]
    for p in precisions:
        for name in names:
            for _ in range(warmup):
                runs[p][name]["step"]()
    order = [(p, name) for p in precisions for name in names]
    tok_s: dict[tuple[str, str], list[float]] = {key: [] for key in order}
    peaks: dict[str, list[float]] = {p: [] for p in precisions}
    for r in range(rounds):
        for p in precisions:
            peaks[p].append(matmul_flops(dev, p))
        k = r % len(order)
        for p, name in order[k:] + order[:k]:
            synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                runs[p][name]["step"]()
            synchronize(dev)
            tok_s[(p, name)].append(steps * tokens_per_step / (time.perf_counter() - t0))
        if log:
            log(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{name}/{p} {tok_s[(p, name)][-1]:,.0f} tok/s" for p, name in order))
    rows = []
    ratios: dict[str, dict[str, float]] = {}
    for p in precisions:
        peak = _summary(peaks[p])
        by = {}
        for name in names:
            c = runs[p][name]
            t = statistics.median(tok_s[(p, name)])
            by[name] = {
                "precision": p, "model": name, "description": DESCRIPTIONS[name],
                "params": c["params"], "tok_s": t, "tok_s_rounds": tok_s[(p, name)],
                "step_seconds": tokens_per_step / t, "flops_per_token": c["flops_per_token"],
                "model_flops_s": c["flops_per_token"] * t,
                "mfu": trusted_mfu(c["flops_per_token"] * t, peak["median"]),
                "compile_seconds": c.get("compile_seconds"),
            }
        for name in names:
            row = by[name]
            row["lmkit_over_this_tok_s"] = by["lmkit"]["tok_s"] / row["tok_s"]
            row["lmkit_over_this_flops_s"] = by["lmkit"]["model_flops_s"] / row["model_flops_s"]
            row["peak_flops"] = peak
            rows.append(row)
        ratios[p] = {f"{mine}/{ref}": by[mine]["model_flops_s"] / by[ref]["model_flops_s"]
                     for mine in names if mine.startswith("lmkit")
                     for ref in ("reference_a", "reference_b")}
    return {
        "benchmark": "train", "preset": preset, "objective": objective, "device": str(dev),
        "threads": torch.get_num_threads(), "steps_per_round": steps, "rounds": rounds,
        "warmup": warmup, "tokens_per_step": tokens_per_step,
        # sequences per forward: lmkit micro-batches as configured, the plain scripts do not
        "sequences_per_forward": {"lmkit": micro, "references": micro * accum},
        "rows": rows, "flops_s_ratios": ratios,
        "bf16_over_fp32": ({name: statistics.median(tok_s[("bf16", name)])
                            / statistics.median(tok_s[("fp32", name)]) for name in names}
                           if {"fp32", "bf16"} <= set(precisions) else None),
        "bf16_note": bf16_note(dev, precisions),
        "mfu_note": "model FLOPs/s (6 x matmul params + attention, per token; each model its "
                    "own) over the median square-matmul FLOP/s measured once per round at the "
                    "same precision (null where that ratio is above 1: the square matmul ran "
                    "slower than the model's own, e.g. bf16 on a CPU without native bf16); every "
                    "figure is a median over interleaved rounds",
    }
