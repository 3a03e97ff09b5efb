"""Several seeds per objective: mean ± sample std across seeds and a one-sided Welch t-test of
each objective's primary metric against a baseline (:mod:`lmkit.core.stats`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lmkit.core.compare.columns import metric_columns
from lmkit.core.compare.entry import Entry
from lmkit.core.compare.training import REUSABLE_DIFFERENCES, config_difference
from lmkit.core.contexts import protocol_of
from lmkit.core.kinds import (
    KIND_MARKS,
    has_free_information,
)
from lmkit.core.stats import mean_std, welch_less
from lmkit.errors import LmkitError


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


def _values(group: SeedGroup, name: str, protocol: str | None = None
            ) -> list[dict[str, Any]] | None:
    """The metric ``name`` (under ``protocol``, when given) of every run of the group (None
    unless all of them have it)."""
    found = [next((m for m in e.metrics if m["name"] == name
                   and (protocol is None or protocol_of(m) == protocol)), None)
             for e in group.entries]
    return None if any(m is None for m in found) else found  # type: ignore[return-value]


def _baseline_metric(base: SeedGroup, mine: dict[str, Any]) -> dict[str, Any]:
    """The baseline metric a row's primary metric is tested against: the baseline's primary
    when it has the same context protocol, else its first metric of that protocol and unit,
    else its primary (the test then says the protocols differ)."""
    primary = base.entries[0].metrics[0]
    if protocol_of(primary) == protocol_of(mine):
        return primary
    return next((m for m in base.entries[0].metrics if protocol_of(m) == protocol_of(mine)
                 and m["unit"] == mine["unit"]), primary)


def seed_summary(entries: list[Entry]) -> list[dict[str, Any]]:
    """Per (objective, metric): the mean ± sample std of the per-seed values over ``n`` seeds,
    beside the root mean square of the runs' own stderrs (their Monte-Carlo error alone; the
    spread across seeds also holds training noise). Empty when no objective has several runs."""
    if not several_seeds(entries):
        return []
    rows = []
    for g in seed_groups(entries):
        for column in metric_columns(g.entries):
            name = column.name
            found = _values(g, name, column.protocol)
            if found is None:
                continue
            values = [m["value"] for m in found]
            finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            mean, std = mean_std(values) if finite else (None, None)
            errs = [m.get("stderr") for m in found]
            rms = (math.sqrt(math.fsum(x * x for x in errs) / len(errs))
                   if all(isinstance(x, (int, float)) for x in errs) else None)
            rows.append({"objective": g.objective, "metric": name, "protocol": column.protocol,
                         "kind": found[0]["kind"],
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
        primary = g.entries[0].metrics[0]
        against = _baseline_metric(base, primary)
        mine = _values(g, primary["name"], protocol_of(primary))
        theirs = _values(base, against["name"], protocol_of(against))
        if mine is None or theirs is None:
            continue
        m, b = mine[0], theirs[0]
        row: dict[str, Any] = {
            "objective": g.objective, "baseline": base_name, "metric": m["name"],
            "kind": m["kind"], "baseline_metric": b["name"], "baseline_kind": b["kind"],
            "protocol": protocol_of(m), "baseline_protocol": protocol_of(b),
            "same_protocol": protocol_of(m) == protocol_of(b),
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
    if not row["same_protocol"]:
        text += (f"; the context protocols differ ({row['protocol']} vs "
                 f"{row['baseline_protocol']}): the difference mixes the objective with the "
                 "context each target saw")
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


def fmt_mean_std(r: dict[str, Any]) -> str:
    """``mark mean ± std`` of a :func:`seed_summary` row (``± -`` with a single seed)."""
    if r["mean"] is None:
        return "-"
    std = f"{r['std']:.4f}" if r["std"] is not None else "-"
    return f"{KIND_MARKS[r['kind']]}{r['mean']:.4f} ± {std}"


def fmt_test(r: dict[str, Any]) -> list[str]:
    """The cells of a :func:`baseline_tests` row: tested, difference, t, df, p."""
    tested = (f"{r['metric']} ({KIND_MARKS[r['kind']].strip()}) vs {r['baseline']} "
              f"{r['baseline_metric']} ({KIND_MARKS[r['baseline_kind']].strip()})"
              + ("" if r["same_protocol"] else f" — context protocols differ ({r['protocol']} "
                                               f"vs {r['baseline_protocol']})"))
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
        lines.append(f"| {r['objective']} | {r['metric']} ({r['unit']}; {r['protocol']}) | "
                     f"{r['n']} | {','.join(map(str, r['seeds']))} | {fmt_mean_std(r)}{note} "
                     f"| {rms} |")
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
