"""The whole ``lmkit compare`` pipeline: runs, optional pack and generation columns, report."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from lmkit.core import distributed
from lmkit.core.compare.entry import CompareObserver, Entry
from lmkit.core.compare.report import cell, sanity_check, write_report
from lmkit.core.compare.seeds import label_entries, resolve_baseline
from lmkit.core.compare.training import (
    compare_objectives,
    compare_runs,
    default_compare_dir,
    eval_options_for,
)
from lmkit.core.memory import peak_rss_bytes
from lmkit.core.registry import get_objective
from lmkit.errors import LmkitError


def add_pack_columns(entries: list[Entry], *, bits: int = 6,
                     log: Callable[[str], None] | None = None) -> None:
    """Pack each run under the default decimal cap and add artifact bytes and its round trip."""
    from lmkit.core.pack import pack_run

    for e in entries:
        if log:
            log(f"packing {e.name} (int{bits})…")
        result = pack_run(e.run_dir, bits=bits, max_tokens=e.eval["data"]["max_tokens"])
        after = result["metrics"][0] if result["metrics"] else None
        e.extra["artifact bytes"] = f"{result['artifact_bytes']:,}"
        if after is not None:
            e.extra["round trip"] = f"{after['name']} {cell(after)}"
        e.extra["pack"] = result


def add_generation_columns(entries: list[Entry], *, num: int = 8, length: int | None = None,
                           steps: int | None = None, seed: int = 0,
                           log: Callable[[str], None] | None = None) -> None:
    """Generative perplexity of each run's samples under the comparison's AR run (the judge),
    always with the samples' unigram entropy (gen-ppl alone rewards repetition)."""
    from lmkit.core.generate import can_judge
    from lmkit.core.genmetrics import add_generation_metrics

    judges = [e for e in entries if can_judge(e.objective)]
    if not judges:
        raise LmkitError("--gen needs a judge in the comparison: an AR run (an objective with "
                         "exact next-token NLL, e.g. ar)")

    def judged() -> list[dict[str, Any]]:
        evals = []
        for e in entries:  # with several seeds, each run is judged by the AR run of its seed
            judge = next((j for j in judges if j.seed == e.seed), judges[0])
            if log:
                log(f"sampling {e.name} and scoring under the {judge.name} judge…")
            evals.append(add_generation_metrics(e.eval, judge.run_dir, num=num, length=length,
                                                steps=steps, seed=seed))
        return evals

    # no collective inside (the samples are not split over ranks): under torchrun rank 0
    # samples and scores, and every rank gets its figures
    for e, ev in zip(entries, distributed.from_main(judged), strict=True):
        e.eval, e.metrics = ev, ev["metrics"]


@dataclass
class CompareRequest:
    """``lmkit compare``: existing ``run_dirs``, or ``objectives`` trained fresh under one
    preset, flags and ``--set`` (only the objective differs), once per seed of ``seeds``; then
    optional packing and generation columns, written to ``out`` (default: a new
    comparisons/<timestamp>). ``baseline``: the objective the others are tested against
    (``none``: no test; default: ``ar`` when present and some objective has several seeds).
    ``eval_opts``: ``--opt key=value`` evaluation options, each given to the objectives that
    declare it."""

    run_dirs: list[Path] = field(default_factory=list)
    objectives: list[str] = field(default_factory=list)
    out: Path | None = None
    preset: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    sets: tuple[str, ...] = ()
    max_tokens: int | None = None
    force: bool = False
    pack: bool = False
    gen: bool = False
    seeds: list[int] | None = None
    baseline: str | None = None
    eval_opts: dict[str, Any] = field(default_factory=dict)


def phase_seconds(entries: list[Entry], wall: float) -> dict[str, float]:
    """Where a comparison's wall clock went, in this process: ``training`` (validation during
    training included, and also given alone as ``validation``), ``evaluation`` and ``other``
    (data preparation, packing, generation columns and the rest), so that training +
    evaluation + other = ``wall``."""
    total = {phase: sum(e.spent.get(phase, 0.0) for e in entries)
             for phase in ("training", "validation", "evaluation")}
    total["other"] = max(0.0, wall - total["training"] - total["evaluation"])
    return {phase: round(seconds, 1) for phase, seconds in total.items()}


class Comparison(NamedTuple):
    """What :func:`run_comparison` made: its directory, its rows, the files it wrote and what it
    cost (``wall_seconds`` from the call to the report, split into ``phases``
    (:func:`phase_seconds`), and this process's ``peak_rss_bytes``)."""

    out: Path
    entries: list[Entry]
    files: dict[str, Path | None]
    cost: dict[str, Any]


def run_comparison(request: CompareRequest, observer: CompareObserver | None = None,
                   log: Callable[[str], None] | None = None) -> Comparison:
    """The whole ``lmkit compare`` pipeline: training or loading, evaluation, the optional pack
    and generation columns, the report."""
    t0 = time.perf_counter()
    r = request
    if bool(r.run_dirs) == bool(r.objectives):
        raise LmkitError("give either RUN_DIRs to compare or --objectives a,b,c to train")
    if r.seeds is not None and r.flags.get("train.seed") is not None:
        raise LmkitError("--seeds and --seed conflict: give one seed with --seed or several "
                         "with --seeds")
    if r.seeds is not None and r.run_dirs:
        raise LmkitError("--seeds trains --objectives once per seed; RUN_DIRs keep their own "
                         "seeds (several runs of one objective are grouped as seeds)")
    if r.objectives and r.baseline and r.baseline.lower() != "none" \
            and r.baseline not in r.objectives:
        raise LmkitError(f"--baseline {r.baseline} is not one of --objectives "
                         f"{','.join(r.objectives)}")
    if r.objectives:
        for name in r.objectives:
            get_objective(name)  # a typo fails before the options are matched to objectives
        out, entries = compare_objectives(r.objectives, out=r.out, preset=r.preset,
                                          flags=r.flags, sets=r.sets, max_tokens=r.max_tokens,
                                          seeds=r.seeds, observer=observer, log=log,
                                          eval_options=eval_options_for(r.objectives,
                                                                        r.eval_opts))
    else:
        out = r.out or distributed.broadcast_object(default_compare_dir())
        if (Path(out) / "compare.json").exists():
            raise LmkitError(f"{out} already holds a comparison (compare.json); choose another "
                             "--out or omit it for a new comparisons/<timestamp>")
        entries = compare_runs(r.run_dirs, force=r.force, max_tokens=r.max_tokens,
                               device=r.flags.get("train.device") or "auto",
                               eval_opts=r.eval_opts, observer=observer)
    if r.pack:
        add_pack_columns(entries, log=log)
    if r.gen:
        add_generation_columns(entries, seed=r.flags.get("train.seed") or 0, log=log)
    label_entries(entries)
    resolve_baseline(entries, r.baseline)  # a baseline not among RUN_DIRs fails before writing
    sanity_check(entries)
    out = Path(out).resolve()
    wall = time.perf_counter() - t0
    cost = {"wall_seconds": round(wall, 1), "peak_rss_bytes": peak_rss_bytes(),
            "phases": phase_seconds(entries, wall)}
    files = distributed.from_main(  # rank 0 writes, all return it
        lambda: write_report(out, entries, {"comparison": str(out)}, baseline=r.baseline,
                             cost=cost))
    return Comparison(out, entries, files, cost)
