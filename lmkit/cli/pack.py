"""``lmkit pack`` and ``lmkit bench pack``: parse, call :mod:`lmkit.core.pack`, print."""

from __future__ import annotations

from pathlib import Path

import click

from lmkit.cli.display import console, emit_json, metric_cell, output
from lmkit.cli.options import (
    Count,
    calib_tokens_option,
    objective_options,
    scoring_options,
    single_process,
)
from lmkit.core.defaults import DEFAULT_CAP_BYTES


@click.command("pack")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--bits", type=click.Choice(["6", "8"]), default="6", show_default=True,
              help="6: int6 GPTQ matrices + int8 embedding, LZMA (the records' recipe); "
                   "8: per-row int8, zlib (the parameter-golf baseline).")
@click.option("--method", type=click.Choice(["gptq", "rtn"]),
              help="Rounding of the matrices [default: gptq for 6 bits, rtn for 8].")
@click.option("--cap-bytes", type=Count(min=1), default=DEFAULT_CAP_BYTES,
              show_default=True,
              help="Artifact size limit in DECIMAL bytes (16,000,000 is not 16 MiB); ±1 values "
                   "are pruned until the file fits.")
@click.option("--compression", type=click.Choice(["zlib", "lzma"]),
              help="[default: zlib for the int8 baseline, lzma otherwise]")
@calib_tokens_option
@scoring_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def pack_command(run_dir, bits, method, cap_bytes, compression, calib_tokens, max_tokens, stride,
                 opts, data_dir, device, dtype, batch_size, as_json) -> None:
    """Quantize RUN_DIR into an artifact under the byte cap and score the round trip.

    Writes RUN_DIR/artifact.int<bits>-<method>.<compression> and RUN_DIR/pack.json. The reported
    `metrics` are those of the dequantized model read back from the file (same contract as
    `lmkit eval`), next to `metrics_before` and the `penalty` (after − before).
    """
    single_process("pack")
    from lmkit.core.pack import pack_run

    result = pack_run(run_dir, bits=int(bits), method=method, cap_bytes=cap_bytes,
                      compression=compression, device=device, calib_tokens=calib_tokens,
                      max_tokens=max_tokens, options=objective_options(opts, stride),
                      data_dir=data_dir, batch_size=batch_size, dtype=dtype,
                      log=None if as_json else console.print)
    if as_json:
        emit_json(result)
        return
    from rich.table import Table

    table = Table(title=f"{result['objective']} · {result['run']} · int{result['bits']} "
                        f"{result['method']}/{result['compression']}")
    for col in ("metric", "before", "after (round trip)", "penalty"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    before = {m["name"]: m for m in result["metrics_before"]}
    for m, p in zip(result["metrics"], result["penalty"], strict=False):
        table.add_row(m["name"], metric_cell(before[m["name"]]), metric_cell(m),
                      f"{p['delta']:+.4f} {p['unit']}")
    output.print(table)
    output.print(f"artifact {result['artifact']}: {result['artifact_bytes']:,} bytes "
                  f"(cap {result['cap_bytes']:,} decimal bytes; "
                  f"{result['pruned_values']:,} ±1 values pruned)")


def _bit_widths(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: expected comma-separated integers, e.g. 6,5,4") from None
    if not widths or any(not 2 <= b <= 8 for b in widths):
        raise click.BadParameter(f"{value!r}: each width must be in 2..8")
    return widths


@click.command("pack")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--bits", default="6", show_default=True, callback=_bit_widths,
              help="Widths at which to compare rtn and gptq, e.g. 6,5,4 (int8/zlib always runs).")
@click.option("--max-tokens", type=Count(min=1),
              help="Validation targets scored per model [default: the whole validation set].")
@click.option("--blocks", type=click.IntRange(min=2), default=8, show_default=True,
              help="Disjoint validation blocks; the spread of paired differences across them "
                   "gives each penalty's stderr.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Evaluation precision (bf16 rounding moves a score by ~5e-5 bpb).")
@calib_tokens_option
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_pack_command(run_dirs, bits, max_tokens, blocks, dtype, calib_tokens, device,
                       as_json) -> None:
    """Round-trip penalty and artifact bytes: int8/zlib, then rtn and gptq (LZMA) per width.

    Each run is scored with its validation metric (nll for ar, nelbo_mc for masked objectives)
    before and after each round trip, on the same blocks with the same seeds, so penalties and
    the gptq − rtn difference are paired; their ± is the stderr across blocks. A difference
    within twice its stderr is not resolved. No pruning (the bytes are each recipe's own);
    artifacts go to a temporary directory.
    """
    from lmkit.core.bench.pack import bench_pack

    result = bench_pack(list(run_dirs), device=device, max_tokens=max_tokens, bits=bits,
                        blocks=blocks, dtype=dtype, calib_tokens=calib_tokens,
                        log=None if as_json else console.print)
    if as_json:
        emit_json(result)
        return
    from rich.table import Table

    for entry in result["runs"]:
        table = Table(title=f"{Path(entry['run']).name} · {entry['objective']} · "
                            f"{entry['metric']} {entry['before']:.4f} {entry['unit']} before · "
                            f"{result['precision']}")
        for col in ("recipe", "bytes", "after", "penalty ± stderr"):
            table.add_column(col, justify="left" if col == "recipe" else "right", no_wrap=True)
        for row in entry["rows"]:
            table.add_row(row["recipe"], f"{row['artifact_bytes']:,}", f"{row['after']:.4f}",
                          f"{row['penalty']:+.5f} ± {row['penalty_stderr']:.5f}")
        output.print(table)
        for c in entry["gptq_vs_rtn"]:
            verdict = ("gptq better" if c["gptq_beats_rtn"] else "rtn better") if c["resolved"] \
                else "not resolved"
            output.print(f"int{c['bits']}: gptq − rtn = {c['gptq_minus_rtn']:+.5f} ± "
                         f"{c['stderr']:.5f} {entry['unit']} ({verdict}; "
                         f"{entry['targets']:,} targets in {result['blocks']} blocks)")
