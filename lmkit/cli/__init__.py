"""The ``lmkit`` command line: parse, call core, print. No logic lives here."""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click

from lmkit import __version__
from lmkit.cli.display import (
    TrainDisplay,
    console,
    emit_json,
    metrics_table,
    output,
)
from lmkit.cli.options import (
    MAX_LENGTH,
    MAX_SAMPLER_STEPS,
    MAX_SAMPLES,
    MAX_SEED,
    Count,
    Finite,
    SingleProcessGroup,
    bounded,
    estimator_seed_option,
    objective_options,
    parse_opts,
    scoring_options,
    single_process,
)
from lmkit.core.memory import keep_freed_memory
from lmkit.errors import LmkitError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lmkit")
def cli() -> None:
    """Train and honestly compare small language models on one shared transformer trunk.

    Every number lmkit prints is bits per byte from the tokenizer's exact byte LUT, labelled with
    its kind (exact, upper bound or score) and its uncertainty.

    \b
    Quick start (the README's main job: AR and both masked-diffusion objectives on the same
    data, trunk, budget and seed, in one table; minutes on a 2-core CPU):
      lmkit compare --objectives ar,mdlm,maskrecon --preset small --tokens 1.5M --max-tokens 32768
    A smoke run in seconds:
      lmkit compare --objectives ar,mdlm,maskrecon --preset tiny --steps 30 --max-tokens 4096
    """


# -- data --------------------------------------------------------------------------------------
@cli.group()
def data() -> None:
    """Prepare corpora into parameter-golf shards."""


@data.command("prepare")
@click.option("--corpus", default="sotu", show_default=True,
              help="A registered corpus name (see `lmkit plugins`), or a path to a .txt file, a "
                   ".jsonl file with a `text` field, or a directory of them.")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path),
              help="Use this SentencePiece model instead of training a new one.")
@click.option("--vocab-size", default=1024, show_default=True,
              help="Vocabulary of a new tokenizer.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory [default: the lmkit cache, where `lmkit train` looks].")
@click.option("--val-fraction", default=0.05, show_default=True,
              help="Fraction of documents held out for validation (seeded, deterministic).")
@click.option("--split-seed", default=0, show_default=True, help="Seed of the train/val split.")
@click.option("--shard-tokens", default=100_000_000, show_default=True,
              help="Maximum tokens per shard file.")
@click.option("--allow-overlap", is_flag=True,
              help="Go on when a validation document's text also occurs in training (duplicates "
                   "in the corpus), recording the count in manifest.json [default: refuse].")
@click.option("--force", is_flag=True, help="Replace an existing prepared directory.")
def data_prepare(corpus: str, tokenizer: Path | None, vocab_size: int, out: Path | None,
                 val_fraction: float, split_seed: int, shard_tokens: int, allow_overlap: bool,
                 force: bool) -> None:
    """Corpus → SentencePiece BPE (parameter-golf settings) → BOS-prefixed uint16 shards.

    Writes `<name>_train_*.bin`, `<name>_val_*.bin`, `tokenizer.model`, `manifest.json` and
    `doc_hashes.bin` (a 16-byte BLAKE2b hash and the split of every document's text after NFKC
    and whitespace collapsing). A validation document whose hash also occurs in training is
    refused (see --allow-overlap); duplicates are not removed.
    """
    single_process("data prepare")
    from lmkit.core.data import prepare

    manifest = prepare(corpus, out=out, tokenizer=tokenizer, vocab_size=vocab_size,
                       val_fraction=val_fraction, split_seed=split_seed,
                       shard_tokens=shard_tokens, allow_overlap=allow_overlap, force=force,
                       log=lambda s: console.print(s))
    console.print(
        f"[green]prepared[/] {manifest['corpus']['name']}: "
        f"{manifest['split']['train_documents']:,} train / {manifest['split']['val_documents']:,} "
        f"val documents, {manifest['tokens']['train']:,} / {manifest['tokens']['val']:,} tokens "
        f"→ {manifest['dir']}"
    )


@data.command("check")
@click.argument("data_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--token-ids", "by_tokens", is_flag=True,
              help="Also hash every document's token ids in an lmkit directory (always done for "
                   "directories without lmkit's doc_hashes.bin).")
@click.option("--docs", type=click.Path(dir_okay=False, path_type=Path),
              help="parameter-golf's docs_selected.jsonl: also compare document texts (its first "
                   "--val-docs documents are validation).")
@click.option("--text-field", default="text", show_default=True,
              help="For --docs: the JSON field holding a document's text.")
@click.option("--val-docs", type=bounded(1, 2**62),
              help="For --docs: validation documents at the start of the file [default: the "
                   "number of documents (BOS ids) in the val shards].")
@click.option("--bos", type=bounded(0, 65535),
              help="BOS id separating documents [default: the manifest's, else 1].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def data_check(data_dir: Path, by_tokens: bool, docs: Path | None, text_field: str,
               val_docs: int | None, bos: int | None, as_json: bool) -> None:
    """Check that no validation document also occurs in training; exit status 1 if one does.

    An lmkit directory is checked from its doc_hashes.bin (and the counts in manifest.json);
    parameter-golf shards (fineweb_train_*.bin, fineweb_val_*.bin) are split at BOS and each
    document's token ids hashed (16-byte BLAKE2b). Shards are streamed; memory holds the
    validation hashes only.
    """
    from lmkit.core.data import check_data, format_report

    report = check_data(data_dir, tokens=by_tokens, docs=docs, text_field=text_field,
                        val_docs=val_docs, bos=bos)
    if as_json:
        emit_json(report)
    else:
        click.echo(format_report(report))
    if not report["ok"]:
        sys.exit(1)


# -- train -------------------------------------------------------------------------------------
def train_options(fn):
    """Options shared by `train` and (later) `compare`."""
    opts = [
        click.option("--data", "data_dir", type=click.Path(path_type=Path),
                     help="Prepared shard directory (parameter-golf shards work unchanged) "
                          "[default: the embedded corpus, prepared on first use]."),
        click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path),
                     help="Tokenizer of --data when the directory has none."),
        click.option("--preset",
                     help="tiny | small | pg-baseline | pg-mdlm (see `lmkit presets`) "
                          "[default: small]."),
        click.option("--steps", type=Count(min=1),
                     help="Budget: optimizer steps [default: the preset's; small: 400]. With "
                          "several budgets training stops at the first reached."),
        click.option("--tokens", type=Count(min=1),
                     help="Budget: training tokens (1500000, 1.5M, 1_500_000 and 1.5e6 alike)."),
        click.option("--time", "seconds", type=Finite(0.0, 366 * 24 * 3600.0),
                     help="Budget: seconds of training, validation and checkpoints excluded; "
                          "the LR warmdown ends at the cap [default: none]."),
        click.option("--seed", type=bounded(0, MAX_SEED),
                     help="Seed for init, data order and masks [default: 1337]."),
        click.option("--device", help="auto | cpu | cuda | cuda:N [default: auto: cuda when "
                                      "available]."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                     help="TOML config (sections [model] [optim] [train] [data] [options])."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key, e.g. --set model.n_layer=4 (repeatable)."),
        click.option("--log", "loggers", metavar="NAME,...",
                     help="Also log every metrics.jsonl record to these loggers, e.g. --log "
                          "trackio,tensorboard (see `lmkit loggers`; config key train.log) "
                          "[default: none; metrics.jsonl is always written]."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def budget_flags(steps, tokens, seconds, seed, device, data_dir, tokenizer,
                 loggers=None) -> dict[str, Any]:
    return {
        "train.steps": steps, "train.tokens": tokens, "train.time": seconds,
        "train.seed": seed, "train.device": device, "train.log": loggers,
        "data.path": str(data_dir) if data_dir else None,
        "data.tokenizer": str(tokenizer) if tokenizer else None,
    }


@cli.command()
@click.option("--objective", help="Objective to train (see `lmkit objectives`) [default: ar].")
@train_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory [default: runs/<objective>-<preset>-<timestamp>].")
@click.option("--resume", help="`auto` (continue --out if it has a checkpoint) or a RUN_DIR; a run "
                               "that stopped before its first checkpoint restarts from step 0.")
@click.option("--quiet", is_flag=True, help="No progress display (metrics.jsonl is still written).")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON on stdout.")
def train(objective, data_dir, tokenizer, preset, steps, tokens, seconds, seed, device,
          config_file, sets, loggers, out, resume, quiet, as_json) -> None:
    """Train a model with an objective on the shared trunk.

    Config precedence: defaults < --preset < --config < flags < --set. The resolved config is
    saved as RUN/config.toml; `lmkit train --config RUN/config.toml` repeats the run, and
    `lmkit train --resume RUN [--steps N]` continues it exactly where it stopped.

    Checkpoints are written every train.ckpt_seconds (and train.ckpt_every steps) and on
    SIGINT/SIGTERM (exit status 130/143 after the checkpoint); a non-finite loss stops the run
    with the last good checkpoint kept. One process trains a run directory at a time.

    \b
    A parameter-golf wall-clock run (20 untimed warm-up steps undone before the clock starts,
    evaluation on an fp32 EMA of the weights):
      lmkit train --preset pg-baseline --time 600 --set train.prime_steps=20 \\
        --set train.ema=0.999
    Data-parallel on N processes (GPUs, or CPU with --device cpu), same global batch and numbers:
      torchrun --standalone --nproc-per-node 8 -m lmkit train --preset pg-baseline --data DIR
    Multi-node: README, "Many processes and machines".
    """
    from lmkit.core.data import open_for_training
    from lmkit.core.plan import plan_training
    from lmkit.core.train import TrainingInterrupted
    from lmkit.core.train import train as train_run

    flags = budget_flags(steps, tokens, seconds, seed, device, data_dir, tokenizer, loggers)
    flags["objective"] = objective
    plan = plan_training(config_file=config_file, preset=preset, flags=flags, sets=sets,
                         out=out, resume=resume)
    source = open_for_training(plan.cfg.data, log=None if quiet else console.print)
    try:
        summary = train_run(plan.cfg, source, plan.run_dir, resume=plan.resume,
                            restart=plan.restart, observer=TrainDisplay(quiet=quiet or as_json))
    except TrainingInterrupted as exc:  # a clean stop on request: 128 + signal, as shells do
        console.print(f"[yellow]{exc}[/]", soft_wrap=True)
        sys.exit(128 + exc.signum)
    if as_json:
        emit_json(summary)


# -- eval --------------------------------------------------------------------------------------
@cli.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@scoring_options
@estimator_seed_option
@click.option("--gen", is_flag=True,
              help="Also generation metrics (kind score): gen_ppl of samples under --judge, with "
                   "their unigram entropy, NFE and tokens/s.")
@click.option("--judge", "judge_dir", type=click.Path(path_type=Path),
              help="For --gen: an AR run with the same tokenizer that scores the samples.")
@click.option("--sampler", help="For --gen: sampler [default: the first serving the objective].")
@click.option("--num", type=bounded(1, MAX_SAMPLES), default=8, show_default=True,
              help="For --gen: number of samples.")
@click.option("--length", type=bounded(1, MAX_LENGTH),
              help="For --gen: tokens per sample [default: 128, at most the context].")
@click.option("--steps", type=bounded(1, MAX_SAMPLER_STEPS),
              help="For --gen: denoising steps T of diffusion samplers [default: --length].")
@click.option("--sampler-opt", "sampler_opts", multiple=True, metavar="KEY=VALUE",
              help="For --gen: a sampler option (repeatable), as `lmkit sample --opt` takes it, "
                   "e.g. remask=0.02 (ddpm); `lmkit samplers` lists them.")
@click.option("--details", is_flag=True, help="Show every detail of each metric in the table.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout (see docs).")
def eval_cmd(run_dir, max_tokens, stride, opts, data_dir, device, dtype, batch_size, seed, gen,
             judge_dir, sampler, num, length, steps, sampler_opts, details, as_json) -> None:
    """Score a run's checkpoint (or an `lmkit export` folder, or a packed ARTIFACT file) on
    validation data in bits per byte.

    Each metric states its kind: `exact` (a true code length), `upper_bound` (a bound on one, with
    the standard error of its estimate) or `score` (neither). Bytes are counted with the
    tokenizer's exact LUT over exactly the scored tokens.
    """
    from lmkit.core.evaluate import evaluate_target

    if gen and judge_dir is None:
        raise LmkitError("--gen needs --judge AR_RUN: an AR run trained with the same tokenizer "
                         "scores the samples")
    if sampler_opts and not gen:
        raise LmkitError("--sampler-opt sets an option of the --gen sampler: add --gen")
    generation = dict(sampler=sampler, num=num, length=length, steps=steps) if gen else None
    if sampler_opts:
        generation["options"] = parse_opts(sampler_opts, "--sampler-opt")
    with console.status("evaluating…", spinner="dots") if not as_json else nullcontext():
        result = evaluate_target(run_dir, device=device, judge=judge_dir, generation=generation,
                                 max_tokens=max_tokens, options=objective_options(opts, stride),
                                 seed=seed, data_dir=data_dir, dtype=dtype,
                                 batch_size=batch_size)
    if as_json:
        emit_json(result)
    else:
        output.print(metrics_table(result, details=details))
        for label, path in (result.get("files") or {}).items():
            output.print(f"{label + ':':<8}{path}", soft_wrap=True)


# -- compare -----------------------------------------------------------------------------------
def parse_seeds(text: str) -> list[int]:
    """``--seeds 1,2,3`` as distinct integers in the range --seed takes."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        seeds = [int(x) for x in items]
    except ValueError:
        raise LmkitError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 1,2,3"
                         ) from None
    if not seeds or any(not 0 <= s <= MAX_SEED for s in seeds) or len(set(seeds)) != len(seeds):
        raise LmkitError(f"--seeds {text!r}: give distinct integers in 0..{MAX_SEED}, e.g. "
                         "--seeds 1,2,3")
    return seeds


@cli.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--objectives", help="Train these objectives (comma-separated) under one budget, "
                                   "seed, preset and data, then compare them.")
@train_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Comparison directory [default: comparisons/<timestamp>].")
@click.option("--max-tokens", type=Count(min=1),
              help="Score a prefix of the validation stream [default: all of it].")
@click.option("--seeds", "seed_list", metavar="S1,S2,...",
              help="Train each objective once per seed (runs OUT/runs/<objective>-s<seed>) and "
                   "report mean ± std across seeds; conflicts with --seed. Runs already complete "
                   "in --out are reused, unfinished ones resumed.")
@click.option("--baseline", metavar="OBJECTIVE",
              help="Test every other objective's primary metric against this one's (one-sided "
                   "Welch t-test on per-seed values) [default: ar when present and some "
                   "objective has several seeds; `none`: no test].")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE",
              help="An evaluation option, given to every objective that declares KEY "
                   "(repeatable), e.g. --opt seed_figures=true (mdlm, maskrecon) or --opt "
                   "doc_isolated=true (ar, mtp).")
@click.option("--force", is_flag=True, help="Compare runs whose data or tokenizer differ.")
@click.option("--pack", "with_pack", is_flag=True,
              help="Also pack each run (int6 GPTQ/LZMA) and report artifact bytes and round trip.")
@click.option("--gen", is_flag=True,
              help="Also sample each run and score the samples under the AR run (kind score): "
                   "generative perplexity with unigram entropy.")
@click.option("--json", "fmt", flag_value="json", help="Print the comparison as JSON.")
@click.option("--md", "fmt", flag_value="md", help="Print the comparison as a markdown table.")
@click.option("--csv", "fmt", flag_value="csv", help="Print the comparison as CSV.")
@click.option("--quiet", is_flag=True, help="No progress display.")
def compare(run_dirs, objectives, data_dir, tokenizer, preset, steps, tokens, seconds, seed,
            device, config_file, sets, loggers, out, max_tokens, seed_list, baseline, opts,
            force, with_pack, gen, fmt, quiet) -> None:
    """One honest table across objectives: trained fresh (--objectives) or existing RUN_DIRs.

    Every cell states its kind — `=` exact, `≤` upper bound (± standard error), `score` — and
    all metrics are bits per byte from the tokenizer's exact LUT. Writes report.md,
    compare.json, compare.csv and val_bpb.png (validation bpb vs tokens) to the comparison
    directory, and which budget made the runs equal (steps, tokens or wall clock). It ends with
    what the comparison cost: its wall clock, split into training (of which validation),
    evaluation and the rest, and its peak resident memory (compare.json: "cost").

    With several seeds (--seeds, or RUN_DIRs holding several runs of one objective that differ
    only in seed) it adds each metric's mean ± sample std across seeds beside the rms of the
    runs' own stderrs, and tests each objective's primary metric against --baseline's.

    Every metric column names its context protocol (non_overlapping, sliding(S),
    document_isolated, ...); one name scored under two protocols gets two columns. With
    --opt seed_figures=true, report.md shows what the seed submissions would have printed
    beside the honest bound.

    \b
    Examples:
      lmkit compare --objectives ar,mdlm,maskrecon --preset tiny --steps 30 --max-tokens 4096 --md
      lmkit compare --objectives ar,mdlm --seeds 1,2,3 --preset tiny --steps 30 --max-tokens 4096
      lmkit compare runs/ar-small runs/mdlm-small --json
      lmkit compare runs/ar-small runs/mdlm-small --opt seed_figures=true --opt doc_isolated=true
    """
    from lmkit.cli.display import CompareDisplay, compare_tables
    from lmkit.core import compare as core

    request = core.CompareRequest(
        run_dirs=list(run_dirs),
        objectives=[o.strip() for o in (objectives or "").split(",") if o.strip()],
        out=out, preset=preset,
        flags=budget_flags(steps, tokens, seconds, seed, device, data_dir, tokenizer, loggers),
        sets=tuple(sets), max_tokens=max_tokens, force=force, pack=with_pack, gen=gen,
        seeds=parse_seeds(seed_list) if seed_list is not None else None, baseline=baseline,
        eval_opts=parse_opts(opts))
    display = CompareDisplay(quiet=quiet or fmt is not None)
    try:
        out, entries, files, cost = core.run_comparison(
            request, observer=display, log=None if quiet or fmt else console.print)
    finally:
        display.close()
    if fmt == "json":
        emit_json({**core.to_json(entries, {"comparison": str(out), "cost": cost},
                                  baseline=baseline),
                   "files": {k: str(v) if v else None for k, v in files.items()}})
    elif fmt == "md":
        click.echo(core.to_markdown(entries, baseline=baseline, cost=cost), nl=False)
    elif fmt == "csv":
        click.echo(core.to_csv(entries), nl=False)
    else:
        for table in compare_tables(entries, baseline=baseline):
            output.print(table)
        png = files["png"] or "(no PNG: install matplotlib, e.g. pip install 'lmkit[plot]')"
        output.print(f"{core.cost_line(cost)}\nreport: {files['report']}\n"
                     f"json:   {files['json']}\ncsv:    {files['csv']}\nplot:   {png}")


# -- plugins -----------------------------------------------------------------------------------
@cli.command()
@click.option("--all", "show_all", is_flag=True, help="Include the built-in plugins.")
@click.option("--json", "as_json", is_flag=True)
def plugins(show_all: bool, as_json: bool) -> None:
    """List installed plugins with their versions and hooks."""
    from lmkit.core.registry import get_registry, plugin_listing

    rows = plugin_listing(include_builtins=show_all)
    for failure in get_registry().deferred:  # strict mode: listed, the listing still answers
        console.print(f"lmkit: {failure} (LMKIT_STRICT_PLUGINS)", soft_wrap=True, markup=False)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        output.print("no third-party plugins installed (use --all to include the built-ins)")
    for row in rows:
        output.print(f"[bold]{row['name']}[/] ({row['distribution']} {row['version']}): "
                      f"{', '.join(row['hooks'])}")


def _list_entries(kind: str, as_json: bool) -> None:
    from lmkit.core.registry import entry_listing

    rows = entry_listing(kind)
    if as_json:
        emit_json(rows)
        return
    from rich.markup import escape

    for row in rows:
        serves = f" (for {', '.join(row['objectives'])})" if "objectives" in row else ""
        output.print(f"[bold]{row['name']}[/]{serves}  {escape(row['description'])}  "
                      f"[dim]({row['plugin']}, {row['distribution']} {row['version']})[/]")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def objectives(as_json: bool) -> None:
    """List the registered training objectives."""
    _list_entries("objective", as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def samplers(as_json: bool) -> None:
    """List the registered samplers."""
    _list_entries("sampler", as_json)


@cli.command("runs")
@click.argument("root", required=False, default=".", type=click.Path(file_okay=False,
                                                                      path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON list, newest run first.")
def runs_cmd(root: Path, as_json: bool) -> None:
    """List the runs under ROOT (default: here), newest first: objective, preset, tokens,
    checkpoint step and the latest validation figure with its kind."""
    import datetime as dt

    from lmkit.core.kinds import format_metric
    from lmkit.core.runlist import list_runs

    if not root.is_dir():
        raise LmkitError(f"{root} is not a directory; pass the folder that holds your runs")
    rows = list_runs(root)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        output.print(f"no runs under {root} (a run is a directory with a run.json)")
        return
    from rich.table import Table

    table = Table(title=f"lmkit runs under {root.resolve()}")
    for col in ("modified", "objective", "preset", "tokens", "step", "latest validation", "path"):
        table.add_column(col, justify="right" if col in ("tokens", "step") else "left")
    for r in rows:
        when = dt.datetime.fromtimestamp(r["modified"]).strftime("%Y-%m-%d %H:%M") \
            if r["modified"] else "-"
        val = r["latest_val"]
        shown = f"{val['name']} {format_metric(val, unit=True)}" if val and val.get("kind") \
            in ("exact", "upper_bound", "score") else "-"
        table.add_row(when, str(r["objective"] or "?"), str(r["preset"] or "?"),
                      f"{r['tokens']:,}" if isinstance(r["tokens"], int) else "-",
                      str(r["checkpoint_step"] if r["checkpoint_step"] is not None else "-"),
                      shown, r["path"])
    output.print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def presets(as_json: bool) -> None:
    """List the model/training presets."""
    from lmkit.core.presets import PRESETS

    rows = [{"name": n, "description": p["description"]} for n, p in PRESETS.items()]
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        output.print(f"[bold]{row['name']}[/]  {row['description']}")


# -- bench -------------------------------------------------------------------------------------
@cli.group(cls=SingleProcessGroup)
def bench() -> None:
    """Speed benchmarks, measured side by side in one process."""


@bench.command("train")
@click.option("--preset", default="small", show_default=True)
@click.option("--objective", default="ar", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=1, show_default=True,
              help="Timed optimizer steps per contender per round.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved rounds (medians are reported).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
              help="Untimed steps per contender first.")
@click.option("--batch-tokens", type=click.IntRange(min=1),
              help="Tokens per step [default: the preset's].")
@click.option("--precision", "precisions", type=click.Choice(["fp32", "bf16"]), multiple=True,
              help="Race at this precision (repeatable) [default: fp32 and bf16 autocast].")
@click.option("--compile", "compiled", is_flag=True,
              help="Also race lmkit with torch.compile-d blocks (its compile time is shown) "
                   "[default: when the preset sets train.compile].")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_train(preset: str, objective: str, steps: int, rounds: int, warmup: int,
                batch_tokens: int | None, precisions: tuple[str, ...], compiled: bool,
                device: str, as_json: bool) -> None:
    """Training throughput of lmkit against two plain references, fp32 and bf16 autocast.

    In one process, on the same data, with the same AdamW and interleaved rounds: lmkit's
    train_step, (a) the parameter-golf baseline GPT written plainly (the same architecture) and
    (b) a GPT-2-style stack of the same width, depth and vocabulary. Reported per model: tokens/s,
    its own model FLOPs/token, model FLOP/s, MFU and lmkit's ratio to it.

    \b
    Example:
      lmkit bench train --preset small --json
    """
    from lmkit.cli.bench_all import print_train_table
    from lmkit.core.bench.train import bench_train as run

    result = run(preset=preset, objective=objective, steps=steps, rounds=rounds, warmup=warmup,
                 batch_tokens=batch_tokens, precisions=precisions or ("fp32", "bf16"),
                 compiled=True if compiled else None, device=device,
                 log=None if as_json else console.print)
    if as_json:
        emit_json(result)
        return
    print_train_table(result)


@bench.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--max-tokens", type=Count(min=1),
              help="Evaluate a prefix of the validation stream.")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE",
              help="An evaluation option of the run's objective (repeatable).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Evaluate this many times in a row; each estimator's median seconds.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_eval(run_dir: Path, max_tokens: int | None, opts: tuple[str, ...], repeats: int,
               device: str, as_json: bool) -> None:
    """Seconds and model calls per 1M evaluated tokens of each estimator, with the stderr reached.

    Train a run first, e.g. `lmkit train --objective mdlm --preset small --out runs/mdlm-small`.
    """
    from lmkit.cli.options import parse_opts
    from lmkit.core.bench.eval import bench_eval as run

    with console.status("evaluating…", spinner="dots") if not as_json else nullcontext():
        result = run(str(run_dir), max_tokens=max_tokens,
                     options=parse_opts(opts), device=device, repeats=repeats)
    if as_json:
        emit_json(result)
        return
    from rich.table import Table

    from lmkit.cli.display import metric_cell

    table = Table(title=f"lmkit bench eval · {result['objective']} · {result['run']}")
    for col in ("metric", "value", "s / 1M tokens", "model calls / 1M tokens"):
        table.add_column(col, justify="left" if col in ("metric", "value") else "right")
    for row in result["rows"]:
        table.add_row(row["metric"], metric_cell({**row, "unit": "bpb"}),
                      f"{row['seconds_per_1m_tokens']:,.0f}",
                      f"{row['model_calls_per_1m_tokens']:,.0f}")
    output.print(table)


@bench.command("coverage")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--seeds", type=click.IntRange(min=2), default=40, show_default=True,
              help="Evaluation seeds per metric.")
@click.option("--max-tokens", type=Count(min=1),
              help="Score a prefix of the validation stream [default: all of it].")
@click.option("--reference-samples", type=click.IntRange(min=2), default=256, show_default=True,
              help="Draws per sequence of the high-precision reference.")
@click.option("--paired", is_flag=True,
              help="Also the paired difference of the first two runs' nelbo_mc.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_coverage(run_dirs: tuple[Path, ...], seeds: int, max_tokens: int | None,
                   reference_samples: int, paired: bool, device: str, as_json: bool) -> None:
    """How often ±2 stderr covers a high-precision value, over many seeds (masked runs).

    An honest stderr covers ≥ 90 % (nominal 95 %) and its spread/stderr ratio is near 1.

    \b
    Example:
      lmkit bench coverage runs/mdlm-tiny --seeds 40 --max-tokens 4096
    """
    from lmkit.core.bench import coverage

    results = []
    with console.status("evaluating…", spinner="dots") if not as_json else nullcontext():
        for d in run_dirs:
            results.append(coverage.coverage_run(d, seeds=seeds, max_tokens=max_tokens,
                                                 reference_samples=reference_samples,
                                                 device=device))
        if paired:
            if len(run_dirs) < 2:
                raise LmkitError("--paired needs two runs")
            results.append(coverage.paired_coverage(
                run_dirs[0], run_dirs[1], seeds=seeds, max_tokens=max_tokens,
                reference_samples=reference_samples, device=device))
    if as_json:
        emit_json(results)
        return
    for r in results:
        fmt = coverage.format_paired if r["benchmark"] == "paired coverage" else \
            coverage.format_rows
        click.echo(fmt(r))


from lmkit.cli.bench_all import bench_all_command  # noqa: E402
from lmkit.cli.export import export_command  # noqa: E402
from lmkit.cli.loggers import loggers_command  # noqa: E402
from lmkit.cli.pack import bench_pack_command, pack_command  # noqa: E402
from lmkit.cli.record import record_command  # noqa: E402
from lmkit.cli.rotation import bench_rotation_command  # noqa: E402
from lmkit.cli.sample import bench_sample_command, sample_command  # noqa: E402

cli.add_command(loggers_command)
cli.add_command(pack_command)
cli.add_command(export_command)
cli.add_command(record_command)
cli.add_command(sample_command)
bench.add_command(bench_pack_command)
bench.add_command(bench_sample_command)
bench.add_command(bench_rotation_command)
bench.add_command(bench_all_command)


# -- entry point -------------------------------------------------------------------------------
def _add_plugin_commands() -> None:
    from lmkit.core.registry import get_registry

    get_registry().add_commands(cli)


def _run(argv: list[str] | None) -> None:
    keep_freed_memory()  # a training step's tensors reuse freed pages instead of faulting them in
    if "WORLD_SIZE" not in os.environ:  # not under torchrun (and `--help` never imports torch)
        _add_plugin_commands()
        cli.main(args=argv, prog_name="lmkit", standalone_mode=False)
        return
    from lmkit.core import distributed

    try:
        with distributed.session():  # join torchrun's process group; rank 0 prints
            console.quiet = output.quiet = not distributed.is_main()
            _add_plugin_commands()
            cli.main(args=argv, prog_name="lmkit", standalone_mode=False)
    except distributed.MainRankError:
        sys.exit(1)  # rank 0 raised it and prints it


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit status 1."""
    # A skipped plugin is reported as one line (the message names entry point and distribution).
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{message}\n"
    try:
        _run(argv)
    except LmkitError as exc:
        from rich.markup import escape

        console.quiet = False  # an error any rank meets alone is printed by that rank
        console.print(f"[red]Error:[/] {escape(str(exc))}", soft_wrap=True)  # [extra] kept
        sys.exit(1)
    except click.exceptions.Abort:
        console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
