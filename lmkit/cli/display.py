"""The human half of logging: a rich progress bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lmkit.core.contexts import protocol_of
from lmkit.core.kinds import format_metric, legend

console = Console(stderr=True, highlight=False, soft_wrap=True)  # progress and logs
output = Console(highlight=False, soft_wrap=True)  # a command's results, on stdout


def emit_json(data: Any) -> None:
    """The one JSON emitter: a command's result on stdout, indented, strict (no NaN)."""
    import click

    from lmkit.core.jsonfile import dumps

    if output.quiet:  # under torchrun only rank 0 prints
        return
    click.echo(dumps(data, indent=2))


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def fmt_seconds(s: float | None) -> str:
    """h:mm:ss or m:ss; a duration is never negative (a budget overrun shows 0:00)."""
    if s is None or s != s:  # None or NaN
        return "-"
    s = max(0, int(round(s)))
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def metric_cell(m: dict[str, Any]) -> str:
    """A metric as one cell: '=' exact, '≤' upper bound, 'score', ± stderr, unit."""
    return format_metric(m, unit=True)


def fmt_mfu(mfu: float | None) -> str:
    """MFU as a percentage, or '-' where it cannot be trusted: no peak, or above 100 % (the
    peak was measured under other conditions than the step, e.g. on a busy shared CPU)."""
    if mfu is None or not 0 <= mfu <= 1:
        return "-"
    return f"{100 * mfu:.1f}%"


def budget_text(budget: dict[str, Any]) -> str:
    """The budgets that are set, and which one ends training: the first reached."""
    parts = [f"{budget['steps']:,} steps" if budget.get("steps") else "",
             f"{fmt_count(budget['tokens'])} tokens" if budget.get("tokens") else "",
             f"{fmt_seconds(budget['seconds'])} of training" if budget.get("seconds") else ""]
    parts = [p for p in parts if p]
    if len(parts) > 1:
        return "budget: " + " or ".join(parts) + ", whichever comes first"
    return f"budget: {parts[0]}" if parts else "budget: none"


def train_line(r: dict[str, Any]) -> str:
    mfu = fmt_mfu(r.get("mfu"))
    extra = "".join(f" | {k} {v:.4g}" for k, v in (r.get("loss_metrics") or {}).items())
    return (f"step {r['step']} | loss {r['loss']:.4f}{extra} | lr×{r['lr_mult']:.2f} | "
            f"{fmt_count(r['tok_s'])} tok/s | mfu {mfu} | tokens {fmt_count(r['tokens'])} | "
            f"eta {fmt_seconds(r.get('eta_s'))}")


def val_line(r: dict[str, Any]) -> str:
    cells = ", ".join(f"{m['name']} {metric_cell(m)}" for m in r["metrics"])
    return f"val @ step {r['step']} ({fmt_count(r['tokens'])} tokens): {cells}"


class TrainDisplay:
    """TrainObserver for people; degrades to one plain line per log step off a TTY."""

    def __init__(self, quiet: bool = False, plain: bool | None = None):
        self.quiet = quiet
        self.plain = (not sys.stderr.isatty()) if plain is None else plain
        self.progress: Progress | None = None
        self.task = None
        self._last_refresh = 0.0

    def on_start(self, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        resumed = f", resumed at step {info['resumed_at']}" if info.get("resumed_at") else ""
        console.print(
            f"[bold]{info['objective']}[/] · preset {info['preset']} · "
            f"{info['params']:,} params · {info['device']} {info['precision']} · "
            f"{info['tokens_per_step']:,} tokens/step{resumed} · {budget_text(info['budget'])}"
            f"\n→ {info['run_dir']}"
        )
        if info.get("prime_steps"):
            what = "compiling the blocks, " if info.get("compiled") else ""
            console.print(f"priming: {info['prime_steps']} untimed step(s), then undone "
                          f"({what}off the training clock)…")
        if not self.plain:
            self.progress = Progress(
                TextColumn("[progress.description]{task.description}"), BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                TextColumn("{task.fields[line]}"), console=console, transient=False,
            )
            self.task = self.progress.add_task("train", total=1.0, line="")
            self.progress.start()

    def on_step(self, step: int, progress: float) -> None:
        """The bar moves by time (at most 4 refreshes a second), not only at log steps."""
        if self.progress is None:
            return
        now = time.monotonic()
        if now - self._last_refresh >= 0.25:
            self._last_refresh = now
            self.progress.update(self.task, completed=progress)

    def on_log(self, record: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=record["progress"], line=train_line(record))
        else:
            console.print(train_line(record))

    def on_val(self, record: dict[str, Any]) -> None:
        if not self.quiet:
            console.print(val_line(record))

    def on_end(self, summary: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
        if not self.quiet:
            console.print(
                f"done: {summary['steps']} steps, {fmt_count(summary['tokens'])} tokens in "
                f"{fmt_seconds(summary['seconds'])} of training"
                + (f" (+ {fmt_seconds(summary['val_seconds'])} validating)"
                   if summary.get("val_seconds") else "")
                + f" → {summary['run_dir']}"
            )




def metrics_table(result: dict[str, Any], details: bool = False) -> Table:
    step = result["checkpoint"]["step"]
    table = Table(title=f"{result['objective']} · {result['run']} · step {step}",
                  caption="\n".join(legend(result["metrics"])), caption_justify="left")
    for col in ("metric", "value", "tokens", "bytes", "protocol", "estimator"):
        table.add_column(col, justify="right" if col in ("tokens", "bytes") else "left",
                         no_wrap=col != "estimator")
    for m in result["metrics"]:
        d = m["detail"]
        estimator = (", ".join(f"{k}={v}" for k, v in d.items()) if details
                     else d.get("estimator", ""))
        table.add_row(m["name"], metric_cell(m), f"{m['tokens']:,}", f"{m['bytes']:,}",
                      protocol_of(m), estimator)
    return table


class CompareDisplay(TrainDisplay):
    """Which objective, which phase, and an ETA across the whole comparison."""

    def __init__(self, quiet: bool = False):
        super().__init__(quiet=quiet)
        self.status = None

    def on_phase(self, index: int, total: int, objective: str, phase: str,
                 eta_s: float | None) -> None:
        if self.quiet:
            return
        if self.status is not None:
            self.status.stop()
            self.status = None
        eta = (f" · about {fmt_seconds(eta_s)} left for the rest, evaluation included"
               if eta_s else "")
        console.rule(f"[{index + 1}/{total}] {objective}: {phase}{eta}")
        if phase == "eval":
            self.status = console.status(f"evaluating {objective}…", spinner="dots")
            self.status.start()

    def eval_progress(self, done: int, total: int) -> None:
        if self.status is not None:
            self.status.update(f"evaluating… {done}/{total} batches")

    def on_evaluated(self, objective: str, seconds: float, reused: bool) -> None:
        if self.quiet:
            return
        if self.status is not None:
            self.status.stop()
            self.status = None
        console.print(f"{objective}: reused the evaluation kept for this protocol" if reused
                      else f"{objective}: evaluated in {fmt_seconds(seconds)}")

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def compare_tables(entries: list[Any], baseline: str | None = None) -> list[Any]:
    """Runs (one row per run), then metrics × runs so it fits a terminal; with several seeds,
    mean ± std per objective and each objective's test against the baseline."""
    from lmkit.core import compare as core

    core.label_entries(entries)
    budget = core.budget_basis(core.comparison_budget(entries))
    runs_table = Table(title="lmkit compare: runs", caption=f"budget: {budget}",
                       caption_justify="left")
    for col in core.HEADLINE:
        runs_table.add_column(col, justify="left" if col == "objective" else "right")
    extra_cols = sorted({k for e in entries for k in e.extra if isinstance(e.extra[k], str)})
    for col in extra_cols:
        runs_table.add_column(col, justify="right")
    for e in entries:
        runs_table.add_row(*core.headline_cells(e),
                           *[str(e.extra.get(c, "")) for c in extra_cols])
    metrics = Table(title="validation metrics (bpb: same tokens, exact LUT bytes)",
                    caption="\n".join(legend([m for e in entries for m in e.metrics])
                                      + core.protocol_lines(entries)),
                    caption_justify="left")
    metrics.add_column("metric (unit; context protocol)")
    for e in entries:
        metrics.add_column(e.name, justify="right", no_wrap=True)
    for column in core.metric_columns(entries):
        metrics.add_row(column.header, *[core.cell(column.pick(e)) for e in entries])
    tables: list[Any] = [runs_table, metrics]
    summary = core.seed_summary(entries)
    if summary:
        seeds = Table(title="across seeds", caption=core.SEEDS_NOTE, caption_justify="left")
        for col in ("objective", "metric", "n seeds", "mean ± std", "per-run stderr (rms)"):
            seeds.add_column(col, justify="left" if col in ("objective", "metric") else "right",
                             no_wrap=col != "metric")
        for r in summary:
            rms = f"±{r['stderr_rms']:.4f}" if r["stderr_rms"] is not None else "-"
            note = f" ({r['note']})" if r["note"] else ""
            seeds.add_row(r["objective"], f"{r['metric']} ({r['unit']}; {r['protocol']})",
                          str(r["n"]),
                          core.fmt_mean_std(r) + note, rms)
        tables.append(seeds)
    tests = core.baseline_tests(entries, baseline)
    if tests:
        against = Table(title=f"vs the baseline {tests[0]['baseline']} (one-sided Welch t-test)",
                        caption="per-seed values of each row's primary metric against the "
                                "baseline's; " + core.TEST_NOTE + (" " + core.FLAGGED_NOTE if any(
                            r["flagged"] for r in tests) else ""), caption_justify="left")
        for col in ("objective", "tested", "difference", "t", "df", "p (one-sided)"):
            against.add_column(col, justify="left" if col in ("objective", "tested") else "right")
        for r in tests:
            against.add_row(r["objective"], *core.fmt_test(r))
        tables.append(against)
    paired = core.paired_rows(entries)
    if paired:
        diff = Table(title="paired differences (the same masks for both runs)",
                     caption="the paired stderr is the uncertainty of the difference; the "
                             "rows' own ± share their Monte-Carlo error", caption_justify="left")
        for col in ("metric", "a − b", "difference", "paired ±", "if independent ±"):
            diff.add_column(col, justify="left" if col in ("metric", "a − b") else "right")
        for r in paired:
            diff.add_row(r["metric"], f"{r['a']} − {r['b']}", f"{r['difference']:+.4f}",
                         f"{r['stderr']:.4f}", f"{r['independent_stderr']:.4f}")
        tables.append(diff)
    warnings = [f"[yellow]warning[/] {e.name}: {w}" for e in entries for w in e.warnings]
    return tables + warnings
