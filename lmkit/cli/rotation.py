"""``lmkit bench rotation``: parse, call :mod:`lmkit.core.bench.rotation`, print."""

from __future__ import annotations

import click

from lmkit.cli.display import console, emit_json, output
from lmkit.cli.options import bounded


@click.command("rotation")
@click.option("--shards", type=bounded(2, 100_000), default=40, show_default=True,
              help="Synthetic training shards written to a temporary directory.")
@click.option("--shard-tokens", type=bounded(2, 2**31 - 1), default=4_000_000,
              show_default=True, help="Tokens per shard (each shard up to 10% shorter).")
@click.option("--group-size", type=bounded(1, 100_000), default=4, show_default=True,
              help="Shards the loader holds in memory at once (data.group_size).")
@click.option("--batch-size", type=bounded(1, 1 << 20), default=64, show_default=True,
              help="Sequences per batch drawn.")
@click.option("--seq-len", type=bounded(1, 1 << 20), default=1024, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def bench_rotation_command(shards: int, shard_tokens: int, group_size: int, batch_size: int,
                           seq_len: int, as_json: bool) -> None:
    """Peak resident memory of one rotating-loader pass over many shards, against one group.

    A fresh process reads every shard once, group_size at a time, into the loader's one buffer;
    its peak resident memory during the pass, minus its resident memory after its imports, is
    set beside the bytes of one group and of the whole corpus. Needs shards × shard-tokens × 2
    bytes of temporary disk.

    \b
    Example (303 MB of shards, 32 MB per group):
      lmkit bench rotation --shards 40 --group-size 4
    """
    from lmkit.core.bench.rotation import bench_rotation

    result = bench_rotation(shards=shards, shard_tokens=shard_tokens, group_size=group_size,
                            batch_size=batch_size, seq_len=seq_len,
                            log=None if as_json else console.print)
    if as_json:
        emit_json(result)
        return
    mb = 1e6
    output.print(
        f"{result['shards']} shards ({result['corpus_bytes'] / mb:,.1f} MB), "
        f"{result['group_size']} in memory ({result['group_bytes'] / mb:,.1f} MB per group): "
        f"peak RSS rose {result['rss_rise_bytes'] / mb:,.1f} MB over one pass = "
        f"{result['rise_over_group']:.2f}× one group, {result['rise_over_corpus']:.3f}× the "
        f"corpus; every shard read once: {'yes' if result['every_shard_once'] else 'NO'} "
        f"({result['batches']:,} batches, {result['seconds']:.1f} s)")
