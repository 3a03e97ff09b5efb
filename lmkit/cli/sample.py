"""``lmkit sample`` and ``lmkit bench sample``: parse, call :mod:`lmkit.core.generate`, print."""

from __future__ import annotations

from pathlib import Path

import click

from lmkit.cli.display import console, emit_json, output
from lmkit.cli.options import (
    MAX_BATCH,
    MAX_LENGTH,
    MAX_SAMPLER_STEPS,
    MAX_SAMPLES,
    MAX_SEED,
    Finite,
    bounded,
    parse_opts,
    single_process,
)
from lmkit.core.defaults import DEFAULT_NUM_SAMPLES


@click.command("sample")
@click.argument("run_dir", metavar="RUN_DIR|EXPORT|ARTIFACT", type=click.Path(path_type=Path))
@click.option("--sampler", help="A registered sampler (see `lmkit samplers`) [default: the first "
                                "that serves the run's objective: ar for AR, ddpm for masked].")
@click.option("--num", type=bounded(1, MAX_SAMPLES), default=DEFAULT_NUM_SAMPLES,
              show_default=True,
              help="Number of samples.")
@click.option("--length", type=bounded(1, MAX_LENGTH),
              help="Tokens to generate per sample [default: 128, at most the run's context].")
@click.option("--steps", type=bounded(1, MAX_SAMPLER_STEPS),
              help="Denoising steps T of diffusion samplers [default: --length].")
@click.option("--seed", type=bounded(0, MAX_SEED), default=0, show_default=True,
              help="Seed of every random draw: the same seed gives the same text.")
@click.option("--prompt", help="Text the samples continue (after BOS).")
@click.option("--temperature", type=Finite(0.0, 1e4), default=1.0, show_default=True,
              help="Softmax temperature (0 = greedy).")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Keep the k most likely tokens (0 = off).")
@click.option("--top-p", type=Finite(0.0, 1.0), default=1.0, show_default=True,
              help="Keep the most likely tokens up to this probability mass (1 = off).")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE",
              help="A sampler option, e.g. use_cache=false (ar), remask=0.02 (ddpm), "
                   "schedule=cosine (confidence), entropy_bound=0.5 (entropy_bounded) or "
                   "block_size=16 (block); `lmkit samplers` lists them.")
@click.option("--batch-size", type=bounded(1, MAX_BATCH),
              help="Samples generated at once [default: all]; the output depends on it.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Precision of the model's forward passes (draws are always float64).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: per sample text, token ids, nfe, seconds, tokens/s.")
def sample_command(run_dir, sampler, num, length, steps, seed, prompt, temperature, top_k, top_p,
                   opts, batch_size, dtype, device, as_json) -> None:
    """Generate text from a run's checkpoint (or an `lmkit export` folder, or a packed
    ARTIFACT's round trip) with a registered sampler.

    Random draws (categorical/Gumbel) are made in float64, from one generator seeded with
    --seed. NFE counts the model's forward passes per batch. A BOS inside a sample (a new
    document) is shown as a blank line.
    """
    single_process("sample")
    from lmkit.core.generate import sample_run

    kwargs = dict(num=num, length=length, steps=steps, seed=seed, prompt=prompt,
                  temperature=temperature, top_k=top_k, top_p=top_p, options=parse_opts(opts),
                  batch_size=batch_size, precision=dtype, device=device)
    if as_json:
        samples = sample_run(run_dir, sampler, **kwargs)
        emit_json({"run": str(run_dir), "sampler": samples[0]["sampler"], "seed": seed,
                    "samples": samples})
        return
    with console.status("sampling…", spinner="dots"):
        samples = sample_run(run_dir, sampler, **kwargs)
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    out = Console(highlight=False)  # the samples are the command's output: stdout
    for s in samples:
        title = (f"{s['sampler']} · sample {s['index']} · {len(s['token_ids'])} tokens · "
                 f"NFE {s['nfe']} · {s['tokens_per_s']:,.0f} tokens/s")
        if not out.is_terminal:  # piped: plain text a script can read, no boxes
            click.echo(f"# {title}\n{s['text']}\n")
            continue
        body = Text(s["prompt"], style="bold")
        body.append(s["text"][len(s["prompt"]):] if s["text"].startswith(s["prompt"])
                    else s["text"])
        out.print(Panel(body, title=title, title_align="left"))


@click.command("sample")
@click.option("--run", "run_dirs", multiple=True, type=click.Path(path_type=Path),
              help="A trained run to benchmark (repeatable).")
@click.option("--objective", "objectives", multiple=True,
              help="Benchmark a freshly initialised --preset model of this objective "
                   "(repeatable) [default without --run: ar and mdlm].")
@click.option("--ar-run", type=click.Path(path_type=Path), hidden=True)
@click.option("--mdlm-run", type=click.Path(path_type=Path), hidden=True)
@click.option("--preset", default="small", show_default=True)
@click.option("--num", type=click.IntRange(min=1), default=2, show_default=True,
              help="Samples generated at once.")
@click.option("--length", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens per sample (at most the context minus BOS).")
@click.option("--steps", type=click.IntRange(min=1),
              help="T of the diffusion samplers [default: 4 × --length].")
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True,
              help="Timed rounds: every sampler runs once per round, the order rotating "
                   "(each sampler's best is kept).")
@click.option("--seed", type=bounded(0, MAX_SEED), default=0, show_default=True)
@click.option("--judge", "judge_dir", type=click.Path(path_type=Path),
              help="An AR run on the same tokenizer: adds each row's gen-ppl (bits per byte of "
                   "its samples under the judge) and unigram entropy [needs --run].")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_sample_command(run_dirs, objectives, ar_run, mdlm_run, preset, num, length, steps,
                         repeats, seed, judge_dir, dtype, device, as_json) -> None:
    """Tokens/s and NFE of every sampler serving each run's (or objective's) model.

    Measured side by side in one process, at the same length and T; the ratios are to the
    first row of each group. Speed-only variants (ar with and without its KV cache) and samplers
    that must agree (ddpm_cache with ddpm) are checked token for token on the way. With --judge,
    the quality of the timed samples too; pass --steps at most --length to compare it at equal
    NFE (every masked sampler then makes at most T model calls).

    \b
    Example:
      lmkit bench sample --run runs/mdlm --judge runs/ar --num 16 --length 127 --steps 32
    """
    from lmkit.core.bench.sample import bench_sample

    sources = [str(p) for p in (*run_dirs, ar_run, mdlm_run) if p] + list(objectives)
    result = bench_sample(sources or ["ar", "mdlm"], preset=preset, num=num, length=length,
                          steps=steps, seed=seed, repeats=repeats, device=device,
                          precision=dtype, judge=judge_dir,
                          log=None if as_json else console.print)
    if as_json:
        emit_json(result)
        return
    from rich.table import Table

    for group in result["groups"]:
        steps_note = f", T={group['steps']}" if group["steps"] else ""
        table = Table(title=f"lmkit bench sample · {group['objective']} · {result['device']} · "
                            f"{group['num']}×{group['length']} tokens{steps_note}",
                      caption=f"model: {group['model']}", caption_justify="left")
        judged = result["judge"] is not None
        columns = ["sampler", "tokens/s", "NFE", "seconds", f"× {group['reference']}"]
        columns += ["gen-ppl (bpb)", "entropy (bits)"] if judged else []
        for col in columns:
            table.add_column(col, justify="left" if col == "sampler" else "right")
        for row in group["rows"]:
            cells = [row["label"], f"{row['tokens_per_s']:,.0f}", str(row["nfe"]),
                     f"{row['seconds']:.2f}", f"{row['speedup']:.2f}×"]
            if judged:
                cells += [_pm(row["gen_ppl"], row["gen_ppl_stderr"]),
                          _pm(row["gen_entropy"], row["gen_entropy_stderr"])]
            table.add_row(*cells)
        output.print(table)
        if judged:
            output.print(f"gen-ppl and entropy: the timed samples, judged by {result['judge']} "
                         "(kind: score; ± one standard error over the samples)")
        for pair, same in group["identical_tokens"].items():
            output.print(f"{pair}: {'identical tokens' if same else '[red]TOKENS DIFFER[/]'}")


def _pm(value: float, stderr: float | None) -> str:
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
