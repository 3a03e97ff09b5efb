"""``lmkit compare``: every objective on the same data, trunk, budget and seed, in one table.

The table never lets a bound or a score pass for an exact likelihood: each cell carries its kind
(``=`` exact, ``≤`` upper bound, ``score``) and its standard error where it is estimated.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lmkit.core import atomic, runs
from lmkit.core.build import batch_geometry
from lmkit.core.config import resolve_config
from lmkit.core.data import open_for_training
from lmkit.core.evaluate import evaluate_run
from lmkit.core.kinds import KIND_MARKS, KIND_NOTES, format_metric, kind_note, legend
from lmkit.core.paired import paired_difference
from lmkit.core.registry import get_objective
from lmkit.core.train import NullObserver, TrainObserver, train
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

    @property
    def tok_s(self) -> float | None:
        return self.tokens / self.train_seconds if self.train_seconds else None


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
    return Entry(objective=meta["objective"], run_dir=Path(run_dir).resolve(),
                 params=meta["model"]["params"],
                 tokens=state["tokens"], train_seconds=state["seconds"],
                 metrics=result["metrics"], eval=result, units=units)


def compare_objectives(
    objectives: list[str],
    *,
    out: Path | None = None,
    preset: str | None = None,
    flags: dict[str, Any] | None = None,
    sets: tuple[str, ...] | list[str] = (),
    max_tokens: int | None = None,
    eval_options: dict[str, dict[str, Any]] | None = None,
    observer: CompareObserver | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Path, list[Entry]]:
    """Train every objective under one config (only the objective differs), then evaluate."""
    observer = observer or NullCompareObserver()
    if not objectives:
        raise LmkitError("--objectives is empty; e.g. --objectives ar,mdlm,maskrecon")
    if len(set(objectives)) != len(objectives):
        raise LmkitError(f"--objectives lists an objective twice: {','.join(objectives)}")
    configs = []
    for name in objectives:
        get_objective(name)  # fail on a typo before any training
        cfg = resolve_config(preset=preset, flags={**(flags or {}), "objective": name},
                             sets=sets)
        ensure_curve(cfg)
        configs.append(cfg)
    out = Path(out) if out else default_compare_dir()
    if (out / "runs").exists() and any((out / "runs").iterdir()):
        raise LmkitError(f"{out} already holds a comparison; choose another --out")
    data = open_for_training(configs[0].data, log)
    entries: list[Entry] = []
    started = time.perf_counter()
    for i, (name, cfg) in enumerate(zip(objectives, configs, strict=True)):
        elapsed = time.perf_counter() - started
        eta = elapsed / i * (len(objectives) - i) if i else None
        observer.on_phase(i, len(objectives), name, "train", eta)
        run_dir = out / "runs" / name
        train(cfg, data, run_dir, observer=observer)
        observer.on_phase(i, len(objectives), name, "eval", None)
        entries.append(_evaluated_entry(run_dir, observer, reuse=False, max_tokens=max_tokens,
                                        device=cfg.train.device,
                                        options=(eval_options or {}).get(name)))
    return out, entries


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
def metric_names(entries: list[Entry]) -> list[str]:
    names: list[str] = []
    for e in entries:
        names += [m["name"] for m in e.metrics if m["name"] not in names]
    return names


def cell(m: dict[str, Any] | None) -> str:
    return format_metric(m)


def paired_rows(entries: list[Entry]) -> list[dict[str, Any]]:
    """Every pair of runs whose Monte-Carlo bounds used the same draws: their difference with
    its own (paired) stderr, beside the stderr it would have if the errors were independent."""
    rows = []
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            by_b = {m["name"]: m for m in b.metrics}
            for m in a.metrics:
                other = by_b.get(m["name"])
                if other is None or m["name"] not in a.units or m["name"] not in b.units:
                    continue
                diff = paired_difference(m, a.units[m["name"]], other, b.units[m["name"]])
                if diff is not None:
                    rows.append({"a": a.objective, "b": b.objective,
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


def to_json(entries: list[Entry], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        **(extra or {}),
        "rows": [{
            "objective": e.objective, "run": str(e.run_dir), "params": e.params,
            "tokens": e.tokens, "train_seconds": round(e.train_seconds, 3), "tok_s": e.tok_s,
            "metrics": e.metrics, "warnings": e.warnings, **e.extra,
        } for e in entries],
        "paired": paired_rows(entries),
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
            for ref, r in references:
                if not 0.5 <= e.params / max(ref.params, 1) <= 2:
                    continue
                for m in mine:
                    if m["tokens"] == r["tokens"] and m["value"] < r["value"] - margin(m):
                        e.warnings.append(
                            f"{m['name']} {format_metric(m)} beats {ref.objective}'s exact "
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
    return [e.objective, f"{e.params:,}", f"{e.tokens:,}", f"{e.train_seconds:.0f}s",
            f"{e.tok_s:,.0f}" if e.tok_s else "-"]


HEADLINE = ["objective", "params", "tokens trained", "train time", "tok/s"]


def to_markdown(entries: list[Entry], title: str = "lmkit compare") -> str:
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
    lines += paired_lines(paired_rows(entries))
    flagged = [(e, w) for e in entries for w in e.warnings]
    if flagged:
        lines += ["", "## Warnings", ""] + [f"* **{e.objective}**: {w}" for e, w in flagged]
    return "\n".join(lines) + "\n"


def to_csv(entries: list[Entry]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    names = metric_names(entries)
    writer.writerow(["objective", "params", "tokens", "train_seconds", "tok_s",
                     *[f"{n}_{k}" for n in names for k in ("kind", "value", "stderr")]])
    for e in entries:
        by = {m["name"]: m for m in e.metrics}
        row = [e.objective, e.params, e.tokens, round(e.train_seconds, 3),
               round(e.tok_s, 1) if e.tok_s else ""]
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
        label = f"{e.objective}: {m0['name']} ({KIND_MARKS[m0['kind']].strip()})"
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


def write_report(out: Path, entries: list[Entry], extra: dict[str, Any] | None = None
                 ) -> dict[str, Path | None]:
    out.mkdir(parents=True, exist_ok=True)
    png = plot_curves(entries, out / "val_bpb.png")
    md = to_markdown(entries)
    if png is not None:
        md += f"\n![validation bpb against tokens seen]({png.name})\n"
    atomic.write_text(out / "report.md", md)
    atomic.write_json(out / "compare.json", to_json(entries, extra))
    atomic.write_text(out / "compare.csv", to_csv(entries))
    return {"report": out / "report.md", "json": out / "compare.json",
            "csv": out / "compare.csv", "png": png}


def add_pack_columns(entries: list[Entry], *, bits: int = 6,
                     log: Callable[[str], None] | None = None) -> None:
    """Pack each run under the default decimal cap and add artifact bytes and its round trip."""
    from lmkit.core.pack import pack_run

    for e in entries:
        if log:
            log(f"packing {e.objective} (int{bits})…")
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
    for e in entries:
        if log:
            log(f"sampling {e.objective} and scoring under the {judges[0].objective} judge…")
        e.eval = add_generation_metrics(e.eval, judges[0].run_dir, num=num, length=length,
                                        steps=steps, seed=seed)
        e.metrics = e.eval["metrics"]


@dataclass
class CompareRequest:
    """``lmkit compare``: existing ``run_dirs``, or ``objectives`` trained fresh under one
    preset, flags and ``--set`` (only the objective differs); then optional packing and
    generation columns, written to ``out`` (default: a new comparisons/<timestamp>)."""

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


def run_comparison(request: CompareRequest, observer: CompareObserver | None = None,
                   log: Callable[[str], None] | None = None
                   ) -> tuple[Path, list[Entry], dict[str, Path | None]]:
    """The whole ``lmkit compare`` pipeline: (comparison directory, entries, files written)."""
    r = request
    if bool(r.run_dirs) == bool(r.objectives):
        raise LmkitError("give either RUN_DIRs to compare or --objectives a,b,c to train")
    if r.objectives:
        out, entries = compare_objectives(r.objectives, out=r.out, preset=r.preset,
                                          flags=r.flags, sets=r.sets, max_tokens=r.max_tokens,
                                          observer=observer, log=log)
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
    sanity_check(entries)
    out = Path(out).resolve()
    files = write_report(out, entries, {"comparison": str(out)})
    return out, entries, files
