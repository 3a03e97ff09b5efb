"""The comparison's outputs: report.md, compare.json, compare.csv and val_bpb.png, with the
paired differences of runs scored with the same draws and the sanity rules."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from lmkit.core import atomic, runs
from lmkit.core.compare.columns import (
    metric_columns,
    protocol_conflicts,
    protocol_lines,
    seed_figure_lines,
    seed_figure_rows,
)
from lmkit.core.compare.entry import Entry
from lmkit.core.compare.seeds import (
    baseline_tests,
    budget_basis,
    comparison_budget,
    label_entries,
    seed_lines,
    seed_summary,
)
from lmkit.core.contexts import protocol_note, protocol_of
from lmkit.core.kinds import (
    KIND_MARKS,
    KIND_NOTES,
    format_metric,
    kind_note,
    legend,
)
from lmkit.core.paired import paired_difference


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
        "columns": [c.to_dict() for c in metric_columns(entries)],
        "protocols": {c.protocol: protocol_note(c.protocol) for c in metric_columns(entries)},
        "protocol_conflicts": protocol_conflicts(entries),
        "seed_figures": seed_figure_rows(entries),
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
                            "proven otherwise" + protocol_clause(m, r))
        exact = [m for m in mine if m["kind"] == "exact"]
        for b in (m for m in mine if m["kind"] == "upper_bound"):
            for x in exact:
                if b["tokens"] == x["tokens"] and b["value"] < x["value"] - margin(b):
                    e.warnings.append(
                        f"upper bound {b['name']} {format_metric(b)} is below this run's exact "
                        f"code length {x['name']} {format_metric(x)} on the same tokens: the "
                        "bound is broken, or the exact code is a looser, different code"
                        + protocol_clause(b, x))


def protocol_clause(a: dict[str, Any], b: dict[str, Any]) -> str:
    """`` (context protocols differ: …)`` when two compared metrics were not scored alike."""
    pa, pb = protocol_of(a), protocol_of(b)
    return "" if pa == pb else (f" (context protocols differ: {a['name']} {pa} vs {b['name']} "
                                f"{pb}, so context explains part of the gap)")


def headline_cells(e: Entry) -> list[str]:
    return [e.name, f"{e.params:,}", f"{e.tokens:,}", f"{e.train_seconds:.0f}s",
            f"{e.tok_s:,.0f}" if e.tok_s else "-"]


HEADLINE = ["objective", "params", "tokens trained", "train time", "tok/s"]


def _duration(seconds: float) -> str:
    """``14 min 05 s``, or ``53 s`` under a minute."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def cost_line(cost: dict[str, Any]) -> str:
    """What a comparison cost, in words: its wall clock, where it went, its peak resident
    memory."""
    phases = cost.get("phases")
    split = ""
    if phases:
        training = (f"training {_duration(phases['training'])}, of which validation "
                    f"{_duration(phases['validation'])}; " if phases["training"] else "")
        split = (f": {training}evaluation {_duration(phases['evaluation'])}; the rest "
                 f"{_duration(phases['other'])}")
    peak = cost.get("peak_rss_bytes")
    memory = (f"peaked at {peak / 1e6:,.0f} MB of resident memory" if peak is not None
              else "its peak memory is not measurable on this platform")
    return (f"The comparison took {_duration(cost['wall_seconds'])} (wall clock, from the start of "
            f"training or loading to the report{split}) and {memory}.")


def to_markdown(entries: list[Entry], title: str = "lmkit compare",
                baseline: str | None = None, cost: dict[str, Any] | None = None) -> str:
    """The comparison as markdown (report.md): one row per run, then the across-seed tables."""
    label_entries(entries)
    columns = metric_columns(entries)
    extra_cols = sorted({k for e in entries for k in e.extra if isinstance(e.extra[k], str)})
    header = HEADLINE + [c.header for c in columns] + extra_cols
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for e in entries:
        row = headline_cells(e) + [cell(c.pick(e)) for c in columns] + [
            str(e.extra.get(c, "")) for c in extra_cols]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *[f"* {note}" for note in legend([m for e in entries for m in e.metrics],
                                                   markdown=True)]]
    lines += [f"* {note}" for note in protocol_lines(entries, markdown=True)]
    first = entries[0].metrics[0] if entries and entries[0].metrics else None
    if first:
        lines.append(f"* Every metric is scored over {first['tokens']:,} validation tokens "
                     f"({first['bytes']:,} bytes) unless its JSON `tokens` says otherwise.")
    lines.append(f"* Budget: {budget_basis(comparison_budget(entries))}.")
    if cost:
        lines.append(f"* {cost_line(cost)}")
    lines += seed_figure_lines(entries)
    lines += seed_lines(entries, baseline)
    lines += paired_lines(paired_rows(entries))
    flagged = [(e, w) for e in entries for w in e.warnings]
    if flagged:
        lines += ["", "## Warnings", ""] + [f"* **{e.name}**: {w}" for e, w in flagged]
    return "\n".join(lines) + "\n"


def to_csv(entries: list[Entry]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    columns = metric_columns(entries)
    writer.writerow(["objective", "seed", "params", "tokens", "train_seconds", "tok_s",
                     *[f"{c.key}_{k}" for c in columns
                       for k in ("kind", "value", "stderr", "protocol")]])
    for e in entries:
        row = [e.objective, "" if e.seed is None else e.seed, e.params, e.tokens,
               round(e.train_seconds, 3), round(e.tok_s, 1) if e.tok_s else ""]
        for c in columns:
            m = c.pick(e)
            row += [m["kind"], m["value"], "" if m["stderr"] is None else m["stderr"],
                    c.protocol] if m else ["", "", "", ""]
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
                 baseline: str | None = None, cost: dict[str, Any] | None = None
                 ) -> dict[str, Path | None]:
    """report.md, compare.json, compare.csv and val_bpb.png (when matplotlib is installed);
    ``cost`` (:func:`cost_line`) goes into the first two."""
    out.mkdir(parents=True, exist_ok=True)
    label_entries(entries)
    if cost:
        extra = {**(extra or {}), "cost": cost}
    png = plot_curves(entries, out / "val_bpb.png")
    md = to_markdown(entries, baseline=baseline, cost=cost)
    if png is not None:
        md += f"\n![validation bpb against tokens seen]({png.name})\n"
    atomic.write_text(out / "report.md", md)
    atomic.write_json(out / "compare.json", to_json(entries, extra, baseline=baseline))
    atomic.write_text(out / "compare.csv", to_csv(entries))
    return {"report": out / "report.md", "json": out / "compare.json",
            "csv": out / "compare.csv", "png": png}
