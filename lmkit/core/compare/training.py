"""Training and evaluating the comparison's runs: fresh (``--objectives``, ``--seeds``) or existing
RUN_DIRs, with runs reused when they match."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmkit.core import config as config_mod
from lmkit.core import distributed, runs
from lmkit.core.build import batch_geometry
from lmkit.core.compare.entry import CompareObserver, Entry, NullCompareObserver
from lmkit.core.config import resolve_config
from lmkit.core.data import open_for_training
from lmkit.core.evaluate import evaluate_run
from lmkit.core.memory import release_memory
from lmkit.core.plan import Budget, budget_done
from lmkit.core.registry import get_objective
from lmkit.core.train import train
from lmkit.errors import LmkitError


def default_compare_dir() -> Path:
    return Path("comparisons") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _evaluated_entry(run_dir: Path, observer: CompareObserver, *, reuse: bool,
                     **scoring: Any) -> Entry:
    """Evaluate a run (or reuse its result kept for exactly this protocol) into an Entry.

    The result is kept in ``RUN/evals/`` under its protocol; the run's ``eval.json`` (the
    latest ``lmkit eval``) is left alone."""
    units: dict[str, Any] = {}
    release_memory()  # the training phase's temporaries
    t0 = time.perf_counter()
    result = evaluate_run(run_dir, latest=False, reuse=reuse, units=units,
                          progress=observer.eval_progress, **scoring)
    seconds = time.perf_counter() - t0
    release_memory()  # the evaluation's, before the next run trains
    meta = runs.read_run_meta(run_dir)
    observer.on_evaluated(meta["objective"], seconds, reused="reused_from" in result)
    state = runs.read_run_state(run_dir)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    seed = (config.get("train") or {}).get("seed")
    return Entry(objective=meta["objective"], run_dir=Path(run_dir).resolve(),
                 params=meta["model"]["params"],
                 tokens=state["tokens"], train_seconds=state["seconds"],
                 metrics=result["metrics"], eval=result, units=units,
                 seed=seed if isinstance(seed, int) else None, config=config,
                 spent={"evaluation": seconds})


def compare_objectives(
    objectives: list[str],
    *,
    out: Path | None = None,
    preset: str | None = None,
    flags: dict[str, Any] | None = None,
    sets: tuple[str, ...] | list[str] = (),
    max_tokens: int | None = None,
    eval_options: dict[str, dict[str, Any]] | None = None,
    seeds: list[int] | None = None,
    observer: CompareObserver | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Path, list[Entry]]:
    """Train every objective under one config (only the objective, and with ``seeds`` the seed,
    differ), then evaluate. Runs ``OUT/runs/<objective>`` (``<objective>-s<seed>`` with seeds);
    one already complete under the same config is reused and an unfinished one resumed, so an
    interrupted comparison continues where it stopped."""
    observer = observer or NullCompareObserver()
    if not objectives:
        raise LmkitError("--objectives is empty; e.g. --objectives ar,mdlm,maskrecon")
    if len(set(objectives)) != len(objectives):
        raise LmkitError(f"--objectives lists an objective twice: {','.join(objectives)}")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise LmkitError(f"--seeds must list distinct seeds, e.g. --seeds 1,2,3 (got "
                         f"{','.join(map(str, seeds)) or 'none'})")
    jobs = []  # seed-major: an interrupted comparison has whole seeds done first
    for seed in seeds if seeds is not None else [None]:
        for name in objectives:
            get_objective(name)  # fail on a typo before any training
            seed_flag = {} if seed is None else {"train.seed": seed}
            cfg = resolve_config(preset=preset, flags={**(flags or {}), "objective": name,
                                                       **seed_flag}, sets=sets)
            ensure_curve(cfg)
            label = name if seed is None else f"{name}-s{seed}"
            jobs.append((name, seed, label, cfg))
    out = Path(out) if out else distributed.broadcast_object(default_compare_dir())
    if (out / "compare.json").exists():
        raise LmkitError(f"{out} already holds a comparison (compare.json); choose another --out")
    plans = [(job, _run_plan(out / "runs" / job[2], job[3])) for job in jobs]
    data = None
    entries: list[tuple[int, Entry]] = []
    started, trained = time.perf_counter(), 0
    for i, ((name, _seed, label, cfg), action) in enumerate(plans):
        to_train = sum(a != "reuse" for _, a in plans[i:])
        eta = (time.perf_counter() - started) / trained * to_train if trained else None
        run_dir = out / "runs" / label
        spent: dict[str, float] = {}
        if action == "reuse":
            observer.on_phase(i, len(plans), label, "complete: reused", None)
        else:
            observer.on_phase(i, len(plans), label, "train" if action == "train" else
                              f"train ({action})", eta)
            data = data or open_for_training(cfg.data, log)
            # a resumed run's state already counts its earlier sessions' validation time
            val_before = (float(runs.read_run_state(run_dir).get("val_seconds", 0.0))
                          if action == "resume" else 0.0)
            t0 = time.perf_counter()
            summary = train(cfg, data, run_dir, resume=action == "resume",
                            restart=action == "restart", observer=observer)
            spent = {"training": time.perf_counter() - t0,
                     "validation": max(0.0, summary["val_seconds"] - val_before)}
            trained += 1
        observer.on_phase(i, len(plans), label, "eval", None)
        entry = _evaluated_entry(run_dir, observer, reuse=action == "reuse",
                                 max_tokens=max_tokens, device=cfg.train.device,
                                 options=(eval_options or {}).get(name) or None)
        entry.spent.update(spent)
        entries.append((objectives.index(name) * len(plans) + i, entry))
    return out, [e for _, e in sorted(entries, key=lambda x: x[0])]


# What may differ between a run found in OUT and the one the comparison would train: bookkeeping
# and placement, never what is learned or the budget it is learned under.
REUSABLE_DIFFERENCES = {"log_every", "val_every", "val_tokens", "ckpt_every", "ckpt_seconds",
                        "device", "compile", "log"}


def config_difference(a: dict[str, Any], b: dict[str, Any],
                      ignore: set[str] = REUSABLE_DIFFERENCES) -> str | None:
    """The first config key (``section.key``) where ``a`` and ``b`` differ, ignoring ``ignore``
    in the train section; None when they agree."""
    for section in sorted(set(a) | set(b)):
        va, vb = a.get(section), b.get(section)
        if isinstance(va, dict) and isinstance(vb, dict):
            for key in sorted(set(va) | set(vb)):
                if section == "train" and key in ignore:
                    continue
                if va.get(key) != vb.get(key):
                    return f"{section}.{key} {va.get(key)!r} vs {vb.get(key)!r}"
        elif va != vb:
            return f"{section} {va!r} vs {vb!r}"
    return None


def _effective_config(cfg: Any) -> dict[str, Any]:
    """The config as training uses it: objective options with their defaults filled in (the
    stored config.toml holds them all; a fresh one only those that were set)."""
    d = config_mod.to_dict(cfg)
    options = config_mod.build_options(get_objective(cfg.objective).obj.Options, cfg.options,
                                        "options")
    d["options"] = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}
    return d


def _run_plan(run_dir: Path, cfg: Any) -> str:
    """What to do with ``run_dir``: ``train`` it fresh, ``resume`` or ``restart`` an unfinished
    run of the same config, or ``reuse`` one that completed its budget."""
    if not runs.has_run_files(run_dir):
        return "train"  # train() itself refuses a non-empty directory that holds no run
    stored = resolve_config(config_file=run_dir / runs.CONFIG_FILE)
    diff = config_difference(_effective_config(stored), _effective_config(cfg))
    if diff:
        raise LmkitError(f"{run_dir} holds a run of another config ({diff}); it cannot be part "
                         f"of this comparison: choose another --out")
    if not runs.has_checkpoint(run_dir):
        return "restart"
    state = runs.read_run_state(run_dir)
    t = cfg.train
    done = budget_done(Budget(t.steps, t.tokens, t.time), state)
    return "reuse" if done else "resume"


CURVE_POINTS = 8


def eval_option_names(objective: str) -> set[str]:
    """The evaluation options (``--opt`` keys) an objective declares."""
    cls = get_objective(objective).obj.EvalOptions
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def eval_options_for(objectives: list[str], opts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``lmkit compare --opt key=value``: each objective gets the keys its evaluation options
    declare (e.g. ``seed_figures`` goes to mdlm and maskrecon, not to ar). A key no objective
    of the comparison declares is an error, not silently dropped."""
    declared = {name: eval_option_names(name) for name in dict.fromkeys(objectives)}
    for key in opts:
        if not any(key in names for names in declared.values()):
            raise LmkitError(f"--opt {key}: no objective of this comparison "
                             f"({', '.join(declared)}) has that evaluation option; see "
                             "docs/api.md for each objective's options")
    return {name: {k: v for k, v in opts.items() if k in names}
            for name, names in declared.items()}


def ensure_curve(cfg: Any) -> None:
    """Validate often enough for a curve of about CURVE_POINTS points."""
    t = cfg.train
    _, _, tokens_per_step = batch_geometry(cfg)
    planned = t.steps or (t.tokens // tokens_per_step if t.tokens else 0)
    if planned:
        every = max(1, planned // CURVE_POINTS)
        t.val_every = min(t.val_every, every) if t.val_every else every


def check_comparable(run_dirs: list[Path], force: bool) -> None:
    """Runs must share data and tokenizer (and should share seq_len) to be compared."""
    metas = []
    for d in run_dirs:
        path = Path(d) / runs.RUN_FILE
        if not path.exists():
            raise LmkitError(f"{d} is not an lmkit run directory ({runs.RUN_FILE} is missing)")
        metas.append((Path(d), runs.read_run_meta(d)))
    first_dir, first = metas[0]
    for d, meta in metas[1:]:
        problems = []
        if meta["data"]["tokenizer"]["sha256"] != first["data"]["tokenizer"]["sha256"]:
            problems.append("a different tokenizer")
        if meta["data"]["tokens"] != first["data"]["tokens"]:
            problems.append("different data")
        seq = ((meta["config"].get("train") or {}).get("seq_len"),
               (first["config"].get("train") or {}).get("seq_len"))
        if seq[0] != seq[1]:
            problems.append(f"seq_len {seq[0]} vs {seq[1]}")
        if problems and not force:
            raise LmkitError(f"{d} and {first_dir} are not comparable ({', '.join(problems)}); "
                             f"pass --force to compare them anyway")


def compare_runs(run_dirs: list[Path], *, force: bool = False, max_tokens: int | None = None,
                 device: str = "auto", eval_opts: dict[str, Any] | None = None,
                 observer: CompareObserver | None = None) -> list[Entry]:
    observer = observer or NullCompareObserver()
    check_comparable(run_dirs, force)
    metas = [runs.read_run_meta(d) for d in run_dirs]
    options = eval_options_for([m["objective"] for m in metas], eval_opts or {})
    entries = []
    for i, (d, meta) in enumerate(zip(run_dirs, metas, strict=True)):
        observer.on_phase(i, len(run_dirs), meta["objective"], "eval", None)
        entries.append(_evaluated_entry(Path(d), observer, reuse=True, max_tokens=max_tokens,
                                        device=device,
                                        options=options[meta["objective"]] or None))
    return entries
