"""``lmkit bench sample``: tokens/s and model calls of every sampler serving each run's objective,
side by side in one process, at the same length and T.

The variants come from the registry, never from a list of names: every registered sampler that
serves the objective, each in the speed-only variants it declares (``bench_variants``: label ->
options that must not change the tokens, e.g. the AR sampler with and without its KV cache).
Variants of one sampler, and a sampler that declares ``same_tokens_as = "other"``, are checked
token for token on the way.
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


def variants(objective: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, sampler, options) of every registered sampler serving ``objective``."""
    out = []
    for entry in samplers_for(objective):
        declared = getattr(entry.obj, "bench_variants", None) or {entry.name: {}}
        out += [(label, entry.name, dict(opts)) for label, opts in declared.items()]
    return out


def same_token_pairs(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Row pairs that must give identical tokens: variants of one sampler, and a sampler with
    its declared ``same_tokens_as``."""
    from lmkit.core.registry import get_registry

    samplers = get_registry().entries["sampler"]
    pairs = []
    for i, j in itertools.combinations(range(len(rows)), 2):
        a, b = rows[i]["sampler"], rows[j]["sampler"]
        if a == b or getattr(samplers[b].obj, "same_tokens_as", None) == a \
                or getattr(samplers[a].obj, "same_tokens_as", None) == b:
            pairs.append((i, j))
    return pairs


def bench_sample(sources: list[str], *, preset: str = "small", num: int = 2, length: int = 128,
                 steps: int | None = None, seed: int = 0, repeats: int = 2,
                 device: str = "auto", precision: str = "fp32",
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One group per source (a run directory or an objective name): tokens/s and NFE of each
    sampler variant, best of ``repeats``, ratios to the group's first row.

    ``steps`` defaults to 4 × ``length``: caching pays off when T exceeds the tokens to reveal.
    """
    if not sources:
        raise LmkitError("lmkit bench sample needs a --run or an --objective to benchmark")
    dev = resolve_device(device)
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
        for label, name, options in variants(objective):
            entry = next(e for e in samplers_for(objective) if e.name == name)
            warm = dataclasses.replace(request, length=min(8, n), options=options)
            generate(setup.model, entry, **kw, request=warm)
            timed = [generate(setup.model, entry, **kw,
                              request=dataclasses.replace(request, options=options))[0]
                     for _ in range(repeats)]
            best = min(timed, key=lambda r: r["seconds"])
            uses_steps |= "steps" in best["detail"]
            outputs.append(best["tokens"])
            rows.append({"label": label, "sampler": name, "options": options, "nfe": best["nfe"],
                         "seconds": best["seconds"], "tokens_per_s": num * n / best["seconds"]})
            if log:
                log(f"{objective}: {label}: {rows[-1]['tokens_per_s']:,.0f} tokens/s, "
                    f"NFE {best['nfe']}")
        if not rows:
            raise LmkitError(f"no registered sampler serves objective {objective!r}")
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
            "precision": precision, "repeats": repeats, "seed": seed, "groups": groups}
