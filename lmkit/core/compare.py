"""``lmkit compare``: every objective on the same data, trunk, budget and seed, in one table.

The table never lets a bound or a score pass for an exact likelihood: each cell carries its kind
(``=`` exact, ``≤`` upper bound, ``score``) and its standard error where it is estimated. With
several seeds per objective it adds the mean ± sample std across seeds and a one-sided Welch
t-test of each objective's primary metric against a baseline's (:mod:`lmkit.core.stats`).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lmkit.core import atomic, runs
from lmkit.core import config as config_mod
from lmkit.core.build import batch_geometry
from lmkit.core.config import resolve_config
from lmkit.core.data import open_for_training
from lmkit.core.evaluate import evaluate_run
from lmkit.core.kinds import (
    KIND_MARKS,
    KIND_NOTES,
    format_metric,
    has_free_information,
    kind_note,
    legend,
)
from lmkit.core.paired import paired_difference
from lmkit.core.registry import get_objective
from lmkit.core.stats import mean_std, welch_less
from lmkit.core.train import Budget, NullObserver, TrainObserver, train
from lmkit.errors import LmkitError


class CompareObserver(TrainObserver, Protocol):
    """Training observer plus the comparison's phases."""

    def on_phase(self, index: int, total: int, objective: str, phase: str,
                 eta_s: float | None) -> None: ...

    def eval_progress(self, done: int, total: int) -> None: ...

    def on_evaluated(self, objective: str, seconds: float, reused: bool) -> None: ...


class NullCompareObserver(NullObserver):
    def on_phase(self, index: int, total: int, objective: str, phase: str,
                 eta_s: float | None) -> None: ...

    def eval_progress(self, done: int, total: int) -> None: ...

    def on_evaluated(self, objective: str, seconds: float, reused: bool) -> None: ...


@dataclass
class Entry:
    """One run in the comparison."""

    objective: str
    run_dir: Path
    params: int
    tokens: int
    train_seconds: float
    metrics: list[dict[str, Any]]
    eval: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # sanity rules the row breaks
    units: dict[str, Any] = field(default_factory=dict, repr=False)  # Monte-Carlo units
    seed: int | None = None  # train.seed: runs of one objective with different seeds are seeds
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # the run's config
    label: str = ""  # the row's name where one objective has several runs (see label_entries)

    @property
    def tok_s(self) -> float | None:
        return self.tokens / self.train_seconds if self.train_seconds else None

    @property
    def name(self) -> str:
        """The row's name in every table: the objective, with its seed where that is needed."""
        return self.label or self.objective

    @property
    def budget(self) -> dict[str, Any] | None:
        """The budgets the run was trained under (None where unset), or None without a config."""
        t = self.config.get("train")
        if not isinstance(t, dict):
            return None
        return {"steps": t.get("steps") or None, "tokens": t.get("tokens") or None,
                "seconds": t.get("time") or None}


def default_compare_dir() -> Path:
    return Path("comparisons") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _evaluated_entry(run_dir: Path, observer: CompareObserver, *, reuse: bool,
                     **scoring: Any) -> Entry:
    """Evaluate a run (or reuse its result kept for exactly this protocol) into an Entry.

    The result is kept in ``RUN/evals/`` under its protocol; the run's ``eval.json`` (the
    latest ``lmkit eval``) is left alone."""
    units: dict[str, Any] = {}
    t0 = time.perf_counter()
    result = evaluate_run(run_dir, latest=False, reuse=reuse, units=units,
                          progress=observer.eval_progress, **scoring)
    seconds = time.perf_counter() - t0
    meta = runs.read_run_meta(run_dir)
    observer.on_evaluated(meta["objective"], seconds, reused="reused_from" in result)
    state = runs.read_run_state(run_dir)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    seed = (config.get("train") or {}).get("seed")
    return Entry(objective=meta["objective"], run_dir=Path(run_dir).resolve(),
                 params=meta["model"]["params"],
                 tokens=state["tokens"], train_seconds=state["seconds"],
                 metrics=result["metrics"], eval=result, units=units,
                 seed=seed if isinstance(seed, int) else None, config=config)


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
    out = Path(out) if out else default_compare_dir()
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
        if action == "reuse":
            observer.on_phase(i, len(plans), label, "complete: reused", None)
        else:
            observer.on_phase(i, len(plans), label, "train" if action == "train" else
                              f"train ({action})", eta)
            data = data or open_for_training(cfg.data, log)
            train(cfg, data, run_dir, resume=action == "resume", restart=action == "restart",
                  observer=observer)
            trained += 1
        observer.on_phase(i, len(plans), label, "eval", None)
        entry = _evaluated_entry(run_dir, observer, reuse=action == "reuse",
                                 max_tokens=max_tokens, device=cfg.train.device,
                                 options=(eval_options or {}).get(name))
        entries.append((objectives.index(name) * len(plans) + i, entry))
    return out, [e for _, e in sorted(entries, key=lambda x: x[0])]


# What may differ between a run found in OUT and the one the comparison would train: bookkeeping
# and placement, never what is learned or the budget it is learned under.
REUSABLE_DIFFERENCES = {"log_every", "val_every", "val_tokens", "ckpt_every", "ckpt_seconds",
                        "device", "compile"}


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
    done = Budget(t.steps, t.tokens, t.time).progress(state["step"], state["tokens"],
                                                      state["seconds"]) >= 1.0
    return "reuse" if done else "resume"


CURVE_POINTS = 8


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
                 device: str = "auto",
                 observer: CompareObserver | None = None) -> list[Entry]:
    observer = observer or NullCompareObserver()
    check_comparable(run_dirs, force)
    entries = []
    for i, d in enumerate(run_dirs):
        meta = runs.read_run_meta(d)
        observer.on_phase(i, len(run_dirs), meta["objective"], "eval", None)
        entries.append(_evaluated_entry(Path(d), observer, reuse=True, max_tokens=max_tokens,
                                        device=device))
    return entries


# -- reports -----------------------------------------------------------------------------------
def label_entries(entries: list[Entry]) -> None:
    """Name each row: its objective alone, or ``objective-s<seed>`` where the objective has
    several runs (the run directory's name where seeds repeat too)."""
    count: dict[str, int] = {}
    for e in entries:
        count[e.objective] = count.get(e.objective, 0) + 1
    pairs = [(e.objective, e.seed) for e in entries]
    for e in entries:
        if count[e.objective] == 1:
            e.label = ""
        elif e.seed is not None and pairs.count((e.objective, e.seed)) == 1:
            e.label = f"{e.objective}-s{e.seed}"
        else:
            e.label = f"{e.objective} ({e.run_dir.name})"


@dataclass
class SeedGroup:
    """The runs of one objective. They are seeds of one another when their configs differ only
    in ``train.seed`` (and bookkeeping), each seed once; otherwise ``problem`` says why not."""

    objective: str
    entries: list[Entry]
    problem: str | None = None

    @property
    def seeds(self) -> list[int | None]:
        return [e.seed for e in self.entries]


def seed_groups(entries: list[Entry]) -> list[SeedGroup]:
    """Group runs by objective, in the order objectives first appear."""
    groups: dict[str, SeedGroup] = {}
    for e in entries:
        groups.setdefault(e.objective, SeedGroup(e.objective, [])).entries.append(e)
    for g in groups.values():
        if len(set(g.seeds)) != len(g.seeds):
            g.problem = "two of its runs share a seed"
            continue
        first = g.entries[0]
        for e in g.entries[1:]:
            diff = config_difference(first.config, e.config, REUSABLE_DIFFERENCES | {"seed"})
            if diff:
                g.problem = f"its runs differ in more than the seed ({diff})"
                break
    return list(groups.values())


def several_seeds(entries: list[Entry]) -> bool:
    """Whether any objective has more than one run: the across-seed tables are then shown."""
    return any(len(g.entries) > 1 for g in seed_groups(entries))


def _values(group: SeedGroup, name: str) -> list[dict[str, Any]] | None:
    """The metric ``name`` of every run of the group (None unless all of them have it)."""
    found = [next((m for m in e.metrics if m["name"] == name), None) for e in group.entries]
    return None if any(m is None for m in found) else found  # type: ignore[return-value]


def seed_summary(entries: list[Entry]) -> list[dict[str, Any]]:
    """Per (objective, metric): the mean ± sample std of the per-seed values over ``n`` seeds,
    beside the root mean square of the runs' own stderrs (their Monte-Carlo error alone; the
    spread across seeds also holds training noise). Empty when no objective has several runs."""
    if not several_seeds(entries):
        return []
    rows = []
    for g in seed_groups(entries):
        for name in metric_names(g.entries):
            found = _values(g, name)
            if found is None:
                continue
            values = [m["value"] for m in found]
            finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            mean, std = mean_std(values) if finite else (None, None)
            errs = [m.get("stderr") for m in found]
            rms = (math.sqrt(math.fsum(x * x for x in errs) / len(errs))
                   if all(isinstance(x, (int, float)) for x in errs) else None)
            rows.append({"objective": g.objective, "metric": name, "kind": found[0]["kind"],
                         "unit": found[0]["unit"], "n": len(values), "seeds": g.seeds,
                         "values": values, "mean": mean, "std": std, "stderr_rms": rms,
                         "tokens": found[0]["tokens"],
                         "free_information": any(has_free_information(m) for m in found),
                         "note": g.problem and f"not seeds of one run: {g.problem}"
                         or (None if finite else "a value is not finite")})
    return rows


def resolve_baseline(entries: list[Entry], baseline: str | None) -> str | None:
    """The objective every other one is tested against: ``baseline`` as given (``none``: no
    test), else ``ar`` when it is present and some objective has several seeds."""
    objectives = [g.objective for g in seed_groups(entries)]
    if baseline is None:
        return "ar" if "ar" in objectives and several_seeds(entries) else None
    if baseline.lower() == "none":
        return None
    if baseline not in objectives:
        raise LmkitError(f"--baseline {baseline} is not in this comparison (objectives: "
                         f"{', '.join(objectives)})")
    return baseline


def _kind_words(kind: str) -> str:
    return kind.replace("_", " ")


def baseline_tests(entries: list[Entry], baseline: str | None) -> list[dict[str, Any]]:
    """For each objective other than the baseline: its primary (first) metric against the
    baseline's primary metric, per seed: the difference of means (row − baseline) and a
    one-sided Welch t-test of H1 "the row is lower (better)"; ``p`` None with a ``reason``
    where the test cannot be made."""
    base_name = resolve_baseline(entries, baseline)
    if base_name is None:
        return []
    groups = {g.objective: g for g in seed_groups(entries)}
    base = groups[base_name]
    rows = []
    for g in groups.values():
        if g is base or not g.entries[0].metrics or not base.entries[0].metrics:
            continue
        mine = _values(g, g.entries[0].metrics[0]["name"])
        theirs = _values(base, base.entries[0].metrics[0]["name"])
        if mine is None or theirs is None:
            continue
        m, b = mine[0], theirs[0]
        row: dict[str, Any] = {
            "objective": g.objective, "baseline": base_name, "metric": m["name"],
            "kind": m["kind"], "baseline_metric": b["name"], "baseline_kind": b["kind"],
            "unit": m["unit"], "n": len(mine), "baseline_n": len(theirs),
            "seeds": g.seeds, "baseline_seeds": base.seeds,
            "mean": None, "baseline_mean": None, "difference": None, "t": None, "df": None,
            "p": None, "reason": None,
        }
        values = [x["value"] for x in mine]
        base_values = [x["value"] for x in theirs]
        finite = all(isinstance(v, (int, float)) and math.isfinite(v)
                     for v in values + base_values)
        problem = None
        if m["unit"] != b["unit"]:
            problem = f"different units ({m['unit']} vs {b['unit']})"
        elif not finite:
            problem = "a value is not finite"
        elif len({x["tokens"] for x in mine + theirs}) > 1:
            problem = "not scored on the same validation tokens"
        elif g.problem or base.problem:
            problem = (f"{g.objective if g.problem else base_name}'s runs are not seeds of one "
                       f"run: {g.problem or base.problem}")
        if finite and m["unit"] == b["unit"]:
            row.update(mean=mean_std(values)[0], baseline_mean=mean_std(base_values)[0])
            row["difference"] = row["mean"] - row["baseline_mean"]
        if problem is None:
            w = welch_less(values, base_values)
            row.update(t=w.t, df=w.df, p=w.p)
            problem = w.reason
        row["reason"] = problem
        row["flagged"] = any(e.warnings for e in g.entries + base.entries)
        row["test"] = test_statement(row, m, b)
        rows.append(row)
    return rows


def test_statement(row: dict[str, Any], m: dict[str, Any], b: dict[str, Any]) -> str:
    """Exactly what was tested, in one sentence (also written to compare.json)."""
    free = " (given free information that AR pays for)" if has_free_information(m) else ""
    text = (f"one-sided Welch t-test on per-seed values of {row['objective']} {row['metric']} "
            f"({_kind_words(row['kind'])}, {row['unit']}){free} vs {row['baseline']} "
            f"{row['baseline_metric']} ({_kind_words(row['baseline_kind'])}, {b['unit']}); "
            f"H1: {row['objective']}'s mean is lower (better); n = {row['n']} vs "
            f"{row['baseline_n']} seeds")
    if row["p"] is None:
        return text + f"; p = null: {row['reason']}"
    return text + f"; t = {row['t']:.3f}, df = {row['df']:.2f}, p = {row['p']:.4g}"


def comparison_budget(entries: list[Entry]) -> dict[str, Any] | None:
    """The budget every run was trained under ({steps, tokens, seconds}, None where unset), or
    None where the runs' budgets differ."""
    budgets = [e.budget for e in entries]
    if not budgets or any(b is None for b in budgets) or any(b != budgets[0] for b in budgets):
        return None
    return dict(budgets[0])  # type: ignore[arg-type]


def budget_basis(budget: dict[str, Any] | None) -> str:
    """Which budget made the runs equal: equal steps, equal tokens or equal wall clock."""
    if budget is None:
        return ("the runs were trained under different budgets: see each run's tokens and "
                "train time")
    parts = [(f"{budget['steps']:,} steps", "equal steps") if budget.get("steps") else None,
             (f"{budget['tokens']:,} tokens", "equal tokens") if budget.get("tokens") else None,
             (f"{budget['seconds']:g} s of training", "equal wall clock")
             if budget.get("seconds") else None]
    set_ = [x for x in parts if x]
    if not set_:
        return "no budget recorded"
    if len(set_) == 1:
        what, basis = set_[0]
        note = "; faster objectives train on more tokens" if basis == "equal wall clock" else ""
        return f"{basis}: {what} per run{note}"
    return (" or ".join(w for w, _ in set_) + " per run, whichever came first (see each run's "
            "tokens trained)")


def metric_names(entries: list[Entry]) -> list[str]:
    names: list[str] = []
    for e in entries:
        names += [m["name"] for m in e.metrics if m["name"] not in names]
    return names


def cell(m: dict[str, Any] | None) -> str:
    return format_metric(m)


def paired_rows(entries: list[Entry]) -> list[dict[str, Any]]:
    """Every pair of runs of one seed whose Monte-Carlo bounds used the same draws: their
    difference with its own (paired) stderr, beside the stderr it would have if the errors were
    independent. Runs of different seeds are never paired: their draws differ."""
    label_entries(entries)
    rows = []
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            if a.seed != b.seed:
                continue
            by_b = {m["name"]: m for m in b.metrics}
            for m in a.metrics:
                other = by_b.get(m["name"])
                if other is None or m["name"] not in a.units or m["name"] not in b.units:
                    continue
                diff = paired_difference(m, a.units[m["name"]], other, b.units[m["name"]])
                if diff is not None:
                    rows.append({"a": a.name, "b": b.name, "seed": a.seed,
                                 "a_run": str(a.run_dir), "b_run": str(b.run_dir), **diff})
    return rows


def paired_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines for :func:`paired_rows`."""
    if not rows:
        return []
    lines = ["", "## Paired differences (same masks for both runs)", "",
             "| metric | a − b | difference (bpb) | paired stderr | if independent |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['a']} − {r['b']} | {r['difference']:+.4f} | "
                     f"±{r['stderr']:.4f} | ±{r['independent_stderr']:.4f} |")
    lines += ["", "* Both runs were scored with the same seed, so their Monte-Carlo errors are "
              "shared (common random numbers): the paired stderr is the uncertainty of the "
              "difference; each row's own ± overstates it."]
    return lines


def fmt_mean_std(r: dict[str, Any]) -> str:
    """``mark mean ± std`` of a :func:`seed_summary` row (``± -`` with a single seed)."""
    if r["mean"] is None:
        return "-"
    std = f"{r['std']:.4f}" if r["std"] is not None else "-"
    return f"{KIND_MARKS[r['kind']]}{r['mean']:.4f} ± {std}"


def fmt_test(r: dict[str, Any]) -> list[str]:
    """The cells of a :func:`baseline_tests` row: tested, difference, t, df, p."""
    tested = (f"{r['metric']} ({KIND_MARKS[r['kind']].strip()}) vs {r['baseline']} "
              f"{r['baseline_metric']} ({KIND_MARKS[r['baseline_kind']].strip()})")
    diff = f"{r['difference']:+.4f}" if r["difference"] is not None else "-"
    if r["p"] is None:
        return [tested, diff, "-", "-", f"null: {r['reason']}"]
    return [tested, diff, f"{r['t']:.3f}", f"{r['df']:.2f}", f"{r['p']:.4g}"]


SEEDS_NOTE = ("mean ± sample standard deviation (n − 1) of the per-seed values; the per-run "
              "stderr is the root mean square of the runs' own Monte-Carlo stderrs (evaluation "
              "noise alone: the spread across seeds also holds training noise)")
TEST_NOTE = ("difference = mean(row) − mean(baseline); p is one-sided (H1: the row is lower, "
             "i.e. better). An upper bound significantly below an exact code length means the "
             "row's true code length is lower too; an upper bound above it decides nothing.")

FLAGGED_NOTE = ("Some tested runs break a sanity rule (see Warnings): a small p says the "
                "difference is unlikely to be seed noise, not that the figures are right.")


def seed_lines(entries: list[Entry], baseline: str | None) -> list[str]:
    """Markdown for the across-seed summary and the tests against the baseline."""
    summary = seed_summary(entries)
    if not summary:
        return []
    lines = ["", "## Across seeds", "",
             "| objective | metric | n seeds | seeds | mean ± std | per-run stderr (rms) |",
             "|---|---|---|---|---|---|"]
    for r in summary:
        rms = f"±{r['stderr_rms']:.4f}" if r["stderr_rms"] is not None else "-"
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['objective']} | {r['metric']} ({r['unit']}) | {r['n']} | "
                     f"{','.join(map(str, r['seeds']))} | {fmt_mean_std(r)}{note} | {rms} |")
    lines += ["", f"* {SEEDS_NOTE}."]
    tests = baseline_tests(entries, baseline)
    if tests:
        lines += ["", f"## Against the baseline ({tests[0]['baseline']})", "",
                  "| objective | tested | difference of means | t | Welch df | p (one-sided) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['objective']} | " + " | ".join(fmt_test(r)) + " |" for r in tests]
        lines += ["", f"* {TEST_NOTE}"] + [f"* {r['test']}." for r in tests]
        if any(r["flagged"] for r in tests):
            lines.append(f"* {FLAGGED_NOTE}")
    return lines


def to_json(entries: list[Entry], extra: dict[str, Any] | None = None,
            baseline: str | None = None) -> dict[str, Any]:
    """The comparison as one JSON object: rows, paired differences, budget, and with several
    seeds the across-seed summary and the tests against the baseline."""
    label_entries(entries)
    tests = baseline_tests(entries, baseline)
    budget = comparison_budget(entries)
    return {
        **(extra or {}),
        "budget": {**budget, "basis": budget_basis(budget)} if budget else None,
        "rows": [{
            "objective": e.objective, "label": e.name, "seed": e.seed, "run": str(e.run_dir),
            "params": e.params, "tokens": e.tokens, "train_seconds": round(e.train_seconds, 3),
            "tok_s": e.tok_s, "budget": e.budget, "metrics": e.metrics, "warnings": e.warnings,
            **e.extra,
        } for e in entries],
        "paired": paired_rows(entries),
        "seeds": seed_summary(entries),
        "baseline": {"objective": tests[0]["baseline"], "tests": tests} if tests else None,
        "kinds": {k: kind_note(k) for k in KIND_NOTES},
    }


def sanity_check(entries: list[Entry]) -> None:
    """Flag rows that break what must hold (``Entry.warnings``; shown in every output).

    * A bound or exact figure that beats a same-size (params within 2x) AR exact figure on the
      same tokens: a diffusion model beating AR is a bug until proven otherwise.
    * A run's upper bound below its own exact code length on the same tokens, beyond 2 stderr.
    """
    from lmkit.core.generate import can_judge

    def margin(m: dict[str, Any]) -> float:
        return 2 * (m.get("stderr") or 0.0)

    references = [(e, m) for e in entries if can_judge(e.objective)
                  for m in e.metrics if m["kind"] == "exact" and m["unit"] == "bpb"]
    for e in entries:
        e.warnings = []
        mine = [m for m in e.metrics if m["unit"] == "bpb" and m["kind"] != "score"]
        if not can_judge(e.objective):
            own_seed = any(ref.seed == e.seed for ref, _ in references)
            for ref, r in references:  # with several seeds: the AR run of the same seed
                if (own_seed and ref.seed != e.seed) or not 0.5 <= e.params / max(ref.params,
                                                                                   1) <= 2:
                    continue
                for m in mine:
                    if m["tokens"] == r["tokens"] and m["value"] < r["value"] - margin(m):
                        e.warnings.append(
                            f"{m['name']} {format_metric(m)} beats {ref.name}'s exact "
                            f"{r['name']} {format_metric(r)} on the same {r['tokens']:,} tokens "
                            "at a similar size: a masked model beating AR is a bug until "
                            "proven otherwise")
        exact = [m for m in mine if m["kind"] == "exact"]
        for b in (m for m in mine if m["kind"] == "upper_bound"):
            for x in exact:
                if b["tokens"] == x["tokens"] and b["value"] < x["value"] - margin(b):
                    e.warnings.append(
                        f"upper bound {b['name']} {format_metric(b)} is below this run's exact "
                        f"code length {x['name']} {format_metric(x)} on the same tokens: the "
                        "bound is broken, or the exact code is a looser, different code")


def headline_cells(e: Entry) -> list[str]:
    return [e.name, f"{e.params:,}", f"{e.tokens:,}", f"{e.train_seconds:.0f}s",
            f"{e.tok_s:,.0f}" if e.tok_s else "-"]


HEADLINE = ["objective", "params", "tokens trained", "train time", "tok/s"]


def to_markdown(entries: list[Entry], title: str = "lmkit compare",
                baseline: str | None = None) -> str:
    """The comparison as markdown (report.md): one row per run, then the across-seed tables."""
    label_entries(entries)
    names = metric_names(entries)
    extra_cols = sorted({k for e in entries for k in e.extra if isinstance(e.extra[k], str)})
    units = {m["name"]: m["unit"] for e in entries for m in e.metrics}
    header = HEADLINE + [f"{n} ({units[n]})" for n in names] + extra_cols
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for e in entries:
        by = {m["name"]: m for m in e.metrics}
        row = headline_cells(e) + [cell(by.get(n)) for n in names] + [str(e.extra.get(c, ""))
                                                                 for c in extra_cols]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *[f"* {note}" for note in legend([m for e in entries for m in e.metrics],
                                                   markdown=True)]]
    first = entries[0].metrics[0] if entries and entries[0].metrics else None
    if first:
        lines.append(f"* Every metric is scored over {first['tokens']:,} validation tokens "
                     f"({first['bytes']:,} bytes) unless its JSON `tokens` says otherwise.")
    lines.append(f"* Budget: {budget_basis(comparison_budget(entries))}.")
    lines += seed_lines(entries, baseline)
    lines += paired_lines(paired_rows(entries))
    flagged = [(e, w) for e in entries for w in e.warnings]
    if flagged:
        lines += ["", "## Warnings", ""] + [f"* **{e.name}**: {w}" for e, w in flagged]
    return "\n".join(lines) + "\n"


def to_csv(entries: list[Entry]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    names = metric_names(entries)
    writer.writerow(["objective", "seed", "params", "tokens", "train_seconds", "tok_s",
                     *[f"{n}_{k}" for n in names for k in ("kind", "value", "stderr")]])
    for e in entries:
        by = {m["name"]: m for m in e.metrics}
        row = [e.objective, "" if e.seed is None else e.seed, e.params, e.tokens,
               round(e.train_seconds, 3), round(e.tok_s, 1) if e.tok_s else ""]
        for n in names:
            m = by.get(n)
            row += [m["kind"], m["value"], "" if m["stderr"] is None else m["stderr"]] if m \
                else ["", "", ""]
        writer.writerow(row)
    return buf.getvalue()


def plot_curves(entries: list[Entry], path: Path) -> Path | None:
    """Validation bpb against tokens seen, one curve per run (None if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for e in entries:
        vals = [r for r in runs.read_metrics(e.run_dir) if r["type"] == "val" and r["metrics"]]
        if not vals:
            continue
        m0 = vals[-1]["metrics"][0]
        label = f"{e.name}: {m0['name']} ({KIND_MARKS[m0['kind']].strip()})"
        samples = m0["detail"].get("samples_per_sequence")
        if samples:  # validation draws fewer samples than the table's evaluation
            label += f", {samples} draws/seq"
        label += f", {m0['tokens']:,} tokens"
        errors = [r["metrics"][0]["stderr"] or 0.0 for r in vals]
        ax.errorbar([r["tokens"] for r in vals], [r["metrics"][0]["value"] for r in vals],
                    yerr=errors if any(errors) else None, marker="o", capsize=3, label=label)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g}M"))
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("lmkit compare: validation bpb during training\n(the validation protocol, "
                 "not the table's: see each curve's draws and tokens)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: Path, entries: list[Entry], extra: dict[str, Any] | None = None,
                 baseline: str | None = None) -> dict[str, Path | None]:
    """report.md, compare.json, compare.csv and val_bpb.png (when matplotlib is installed)."""
    out.mkdir(parents=True, exist_ok=True)
    label_entries(entries)
    png = plot_curves(entries, out / "val_bpb.png")
    md = to_markdown(entries, baseline=baseline)
    if png is not None:
        md += f"\n![validation bpb against tokens seen]({png.name})\n"
    atomic.write_text(out / "report.md", md)
    atomic.write_json(out / "compare.json", to_json(entries, extra, baseline=baseline))
    atomic.write_text(out / "compare.csv", to_csv(entries))
    return {"report": out / "report.md", "json": out / "compare.json",
            "csv": out / "compare.csv", "png": png}


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
    for e in entries:  # with several seeds, each run is judged by the AR run of its seed
        judge = next((j for j in judges if j.seed == e.seed), judges[0])
        if log:
            log(f"sampling {e.name} and scoring under the {judge.name} judge…")
        e.eval = add_generation_metrics(e.eval, judge.run_dir, num=num, length=length,
                                        steps=steps, seed=seed)
        e.metrics = e.eval["metrics"]


@dataclass
class CompareRequest:
    """``lmkit compare``: existing ``run_dirs``, or ``objectives`` trained fresh under one
    preset, flags and ``--set`` (only the objective differs), once per seed of ``seeds``; then
    optional packing and generation columns, written to ``out`` (default: a new
    comparisons/<timestamp>). ``baseline``: the objective the others are tested against
    (``none``: no test; default: ``ar`` when present and some objective has several seeds)."""

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


def run_comparison(request: CompareRequest, observer: CompareObserver | None = None,
                   log: Callable[[str], None] | None = None
                   ) -> tuple[Path, list[Entry], dict[str, Path | None]]:
    """The whole ``lmkit compare`` pipeline: (comparison directory, entries, files written)."""
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
        out, entries = compare_objectives(r.objectives, out=r.out, preset=r.preset,
                                          flags=r.flags, sets=r.sets, max_tokens=r.max_tokens,
                                          seeds=r.seeds, observer=observer, log=log)
    else:
        out = r.out or default_compare_dir()
        if (Path(out) / "compare.json").exists():
            raise LmkitError(f"{out} already holds a comparison (compare.json); choose another "
                             "--out or omit it for a new comparisons/<timestamp>")
        entries = compare_runs(r.run_dirs, force=r.force, max_tokens=r.max_tokens,
                               device=r.flags.get("train.device") or "auto", observer=observer)
    if r.pack:
        add_pack_columns(entries, log=log)
    if r.gen:
        add_generation_columns(entries, seed=r.flags.get("train.seed") or 0, log=log)
    label_entries(entries)
    resolve_baseline(entries, r.baseline)  # a baseline not among RUN_DIRs fails before writing
    sanity_check(entries)
    out = Path(out).resolve()
    files = write_report(out, entries, {"comparison": str(out)}, baseline=r.baseline)
    return out, entries, files
