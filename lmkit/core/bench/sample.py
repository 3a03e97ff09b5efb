"""``lmkit bench sample``: tokens/s and model calls of every sampler serving each run's objective,
side by side in one process, at the same length and T; with a judge, the quality of the very
tokens timed (gen-ppl and unigram entropy, as ``lmkit eval --gen`` computes them).

The variants come from the registry, never from a list of names: every registered sampler that
serves the objective, each in the speed-only variants it declares (``bench_variants``: label ->
options that must not change the tokens, e.g. the AR sampler with and without its KV cache) and
in the settings it wants compared (``bench_options``: options that change the tokens, e.g.
``ddpm``'s remasking; a row each, labelled ``name (key=value)``). Speed variants of one sampler,
and a sampler that declares ``same_tokens_as = "other"`` with ``other`` under the same options,
are checked token for token on the way.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmkit.core import runs
from lmkit.core.build import build
from lmkit.core.config import resolve_config
from lmkit.core.data import open_for_training
from lmkit.core.device import resolve_device
from lmkit.core.generate import SampleRequest, generate, samplers_for
from lmkit.errors import LmkitError


def bench_model(source: str, preset: str, device: torch.device) -> tuple[Any, str]:
    """(a Setup-like object with objective, model, tokens, cfg; description) for a run
    directory, or a freshly initialised ``preset`` model of the objective named ``source``
    (sampling throughput does not depend on the weights)."""
    if Path(source).is_dir():
        run = runs.load_run(source, device=device)
        return run, str(run.path.resolve())
    cfg = resolve_config(preset=preset, flags={"objective": source, "train.steps": 1})
    setup = build(cfg, open_for_training(cfg.data), device=device)
    setup.model.eval()
    return setup, f"freshly initialised {preset!r} model (throughput does not need training)"


def variants(objective: str) -> list[tuple[str, str, dict[str, Any], bool]]:
    """(label, sampler, options, is a speed-only variant) of every registered sampler serving
    ``objective``: its ``bench_variants`` (or itself), then one row per ``bench_options``."""
    out = []
    for entry in samplers_for(objective):
        declared = getattr(entry.obj, "bench_variants", None)
        out += [(label, entry.name, dict(opts), True) for label, opts in declared.items()] \
            if declared else [(entry.name, entry.name, {}, False)]
        for opts in getattr(entry.obj, "bench_options", ()) or ():
            shown = ", ".join(f"{k}={v}" for k, v in opts.items())
            out.append((f"{entry.name} ({shown})", entry.name, dict(opts), False))
    return out


def same_token_pairs(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Row pairs that must give identical tokens: speed variants of one sampler, and a sampler
    with its declared ``same_tokens_as`` under the same options."""
    from lmkit.core.registry import get_registry

    samplers = get_registry().entries["sampler"]
    pairs = []
    for i, j in itertools.combinations(range(len(rows)), 2):
        a, b = rows[i]["sampler"], rows[j]["sampler"]
        speed = a == b and rows[i]["speed_variant"] and rows[j]["speed_variant"]
        twins = (getattr(samplers[b].obj, "same_tokens_as", None) == a
                 or getattr(samplers[a].obj, "same_tokens_as", None) == b) \
            and rows[i]["options"] == rows[j]["options"]
        if speed or twins:
            pairs.append((i, j))
    return pairs


def load_judge(judge: str | Path | None, sources: list[str], device: torch.device) -> Any:
    """The AR judge run (checked against every source's tokenizer), or None without one."""
    if judge is None:
        return None
    from lmkit.core.genmetrics import check_judge

    for source in sources:
        if not Path(source).is_dir():
            raise LmkitError(f"--judge scores trained runs: {source!r} is not a run directory "
                             "(the samples of a freshly initialised model say nothing); pass --run")
        check_judge(source, judge)
    return runs.load_run(judge, device=device)


def quality(judge: Any, setup: Any, tokens: torch.Tensor, base: dict[str, Any]) -> dict[str, Any]:
    """gen-ppl (bpb under the judge) and unigram entropy of one row's samples, with stderrs."""
    from lmkit.core.genmetrics import judge_samples

    ppl, entropy = judge_samples(judge, setup.lut, tokens, 1, base)
    return {"gen_ppl": ppl.value, "gen_ppl_stderr": ppl.stderr, "gen_entropy": entropy.value,
            "gen_entropy_stderr": entropy.stderr}


def bench_sample(sources: list[str], *, preset: str = "small", num: int = 2, length: int = 128,
                 steps: int | None = None, seed: int = 0, repeats: int = 2,
                 device: str = "auto", precision: str = "fp32", judge: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One group per source (a run directory or an objective name): tokens/s and NFE of each
    sampler variant, best of ``repeats`` interleaved rounds, ratios to the group's first row;
    with ``judge`` (an AR run on the same tokenizer), each row's gen-ppl and entropy too.

    ``steps`` defaults to 4 × ``length``: caching pays off when T exceeds the tokens to reveal.
    With T ≤ ``length`` every masked sampler makes at most T model calls (``ddpm``, ``confidence``
    and ``block`` exactly T; the adaptive ones fewer): the quality columns are then at equal NFE.
    """
    if not sources:
        raise LmkitError("lmkit bench sample needs a --run or an --objective to benchmark")
    dev = resolve_device(device)
    judge_run = load_judge(judge, sources, dev)
    groups = []
    for source in sources:
        setup, description = bench_model(source, preset, dev)
        objective = setup.cfg.objective
        n = min(length, setup.cfg.train.seq_len - 1)
        T = steps or 4 * n
        request = SampleRequest(num=num, length=n, steps=T, seed=seed, precision=precision)
        kw = dict(objective=setup.objective, tokens=setup.tokens,
                  prompt=torch.tensor([setup.tokens.bos_id]), context=setup.cfg.train.seq_len)
        rows, outputs, uses_steps = [], [], False
        found = variants(objective)
        if not found:
            raise LmkitError(f"no registered sampler serves objective {objective!r}")
        entries = [next(e for e in samplers_for(objective) if e.name == name)
                   for _, name, _, _ in found]
        for entry, (_, _, options, _) in zip(entries, found, strict=True):
            generate(setup.model, entry, **kw,
                     request=dataclasses.replace(request, length=min(8, n), options=options))
        # interleaved rounds, the order rotating each round: a machine that slows down (or
        # speeds up) over the bench hits every variant alike instead of the later ones
        timed: list[list[dict[str, Any]]] = [[] for _ in found]
        order = list(range(len(found)))
        for r in range(repeats):
            k = r % len(order)
            for i in order[k:] + order[:k]:
                request_i = dataclasses.replace(request, options=found[i][2])
                timed[i].append(generate(setup.model, entries[i], **kw, request=request_i)[0])
            if log:
                log(f"{objective}: round {r + 1}/{repeats} of {len(found)} samplers done")
        for (label, name, options, speed_variant), runs_of in zip(found, timed, strict=True):
            best = min(runs_of, key=lambda r: r["seconds"])
            uses_steps |= "steps" in best["detail"]
            outputs.append(best["tokens"])
            rows.append({"label": label, "sampler": name, "options": options,
                         "speed_variant": speed_variant, "nfe": best["nfe"],
                         "seconds": best["seconds"], "tokens_per_s": num * n / best["seconds"]})
            if judge_run is not None:
                rows[-1] |= quality(judge_run, setup, best["tokens"], {
                    "sampler": name, "options": options, "samples": num, "length": n, "steps": T,
                    "seed": seed, "judge": str(judge_run.path)})
            if log:
                scored = f", gen-ppl {rows[-1]['gen_ppl']:.4f} bpb" if judge_run else ""
                log(f"{objective}: {label}: {rows[-1]['tokens_per_s']:,.0f} tokens/s, "
                    f"NFE {best['nfe']}{scored}")
        for row in rows:
            row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
            row["nfe_ratio"] = row["nfe"] / rows[0]["nfe"]
        groups.append({
            "objective": objective, "model": description, "num": num, "length": n,
            "steps": T if uses_steps else None, "reference": rows[0]["label"], "rows": rows,
            "identical_tokens": {f"{rows[i]['label']} == {rows[j]['label']}":
                                 torch.equal(outputs[i], outputs[j])
                                 for i, j in same_token_pairs(rows)},
        })
    return {"benchmark": "sample", "device": str(dev), "threads": torch.get_num_threads(),
            "precision": precision, "repeats": repeats, "seed": seed,
            "judge": str(judge_run.path) if judge_run is not None else None, "groups": groups}
