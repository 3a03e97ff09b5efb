"""``lmkit bench all`` (and the train bench's table): parse, call :mod:`lmkit.core.bench`, print."""

from __future__ import annotations

from typing import Any

import click

from lmkit.cli.display import console, emit_json, fmt_mfu, output
from lmkit.core.defaults import DEFAULT_NUM_SAMPLES


def print_train_table(result: dict[str, Any]) -> None:
    """lmkit and the references per precision: tokens/s, FLOPs/token, model FLOP/s, MFU and
    lmkit's ratio to each row; then the matmul peak's median and spread."""
    from rich.table import Table

    table = Table(title=f"lmkit bench train · {result['objective']} · preset {result['preset']} "
                        f"· {result['device']} · {result['tokens_per_step']:,} tokens/step",
                  caption="medians over interleaved rounds; 'lmkit ×' = lmkit's model FLOP/s "
                          "over the row's (tokens/s ratios and exact parameter counts: --json). "
                          "MFU '-': the ratio to the matmul peak measured now exceeds 100 %",
                  caption_justify="left")
    # narrow enough for an 80-column terminal with the longest model name in full
    for col in ("prec", "model", "params", "tok/s", "MFLOP\n/token", "GFLOP/s", "MFU",
                "lmkit ×\nFLOP/s"):
        table.add_column(col, justify="left" if col == "model" else "right",
                         no_wrap=col == "model")
    for row in result["rows"]:
        table.add_row(row["precision"], row["model"], f"{row['params'] / 1e6:.2f}M",
                      f"{row['tok_s']:,.0f}", f"{row['flops_per_token'] / 1e6:.2f}",
                      f"{row['model_flops_s'] / 1e9:.1f}", fmt_mfu(row["mfu"]),
                      f"{row['lmkit_over_this_flops_s']:.2f}×")
    output.print(table)
    seen = set()
    for row in result["rows"]:
        p, peak = row["precision"], row["peak_flops"]
        if p not in seen:
            seen.add(p)
            output.print(f"peak matmul {p}: {peak['median'] / 1e9:,.1f} GFLOP/s median "
                         f"(min {peak['min'] / 1e9:,.1f}, max {peak['max'] / 1e9:,.1f} over "
                         f"{result['rounds']} rounds)")
        if row.get("compile_seconds") is not None:
            output.print(f"{row['model']} {p}: first step (compiling) "
                         f"{row['compile_seconds']:.1f}s")
    for name, ratio in (result["bf16_over_fp32"] or {}).items():
        output.print(f"bf16 / fp32 tokens/s, {name}: {ratio:.2f}×")
    seqs = result["sequences_per_forward"]
    output.print(f"sequences per forward: lmkit {seqs['lmkit']} (its micro-batch), the "
                 f"references {seqs['references']} (the whole step, as a plain script does)")
    for p, ratios in result["flops_s_ratios"].items():
        output.print(f"model FLOP/s ratios, {p}: "
                     + ", ".join(f"{pair} {r:.2f}×" for pair, r in ratios.items()))
    if result.get("bf16_note"):
        output.print(f"bf16: {result['bf16_note']}")


@click.command("all")
@click.option("--preset", default="small", show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved rounds of the training bench (one step each).")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Tokens per step of the training bench (the model keeps the preset's shape).")
@click.option("--num", type=click.IntRange(min=1), default=DEFAULT_NUM_SAMPLES,
              show_default=True,
              help="Samples every sampler draws at once (`lmkit sample`'s default): the KV "
                   "cache's gain grows with it.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_all_command(preset: str, rounds: int, batch_tokens: int, num: int, device: str,
                      as_json: bool) -> None:
    """Train, eval and sample benches in one process, with lmkit's ratios to the references.

    Trains the short AR run the evaluation bench needs itself; a few minutes on a 2-core CPU.

    \b
    Example:
      lmkit bench all --json > bench.json
    """
    from lmkit.core.bench.all import bench_all

    result = bench_all(preset=preset, rounds=rounds, batch_tokens=batch_tokens, num=num,
                       device=device, log=None if as_json else console.print)
    if as_json:
        emit_json(result)
        return
    print_train_table(result["train"])
    for row in result["eval"]["rows"]:
        output.print(f"eval {row['metric']}: {1e6 / row['seconds_per_1m_tokens']:,.0f} tokens/s")
    for group in result["sample"]["groups"]:
        for row in group["rows"]:
            output.print(f"sample {group['objective']} {row['label']}: "
                         f"{row['tokens_per_s']:,.0f} tokens/s, NFE {row['nfe']}")
    for key, value in result["summary"].items():
        output.print(f"{key}: {value:,.2f}")
    peak = result["peak_rss_bytes"]
    output.print(f"wall clock: {result['wall_seconds']:.0f}s"
                 + (f", peak resident memory {peak / 1e6:,.0f} MB" if peak is not None else ""))
