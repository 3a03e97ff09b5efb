"""Rotation at scale: many shards, ``group_size`` of them in memory, every shard once per pass in
a seed-determined order (the memory figure itself is ``lmkit bench rotation``'s)."""

from __future__ import annotations

import numpy as np
import pytest

from lmkit.core.bench.rotation import bench_rotation
from lmkit.core.data import RotatingLoader, write_shard

N_SHARDS, GROUP = 40, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """40 shards of unequal sizes, shard i holding only token id i: a batch names its shards."""
    root = tmp_path_factory.mktemp("rotation")
    paths = []
    for i in range(N_SHARDS):
        path = root / f"syn_train_{i:06d}.bin"
        write_shard(path, np.full(40 + (7 * i) % 23, i, dtype=np.uint16))
        paths.append(path)
    return paths


def visits(shards, seed, passes=2):
    """Per pass: the shards in the order their tokens were drawn (each run of equal ids once)."""
    loader = RotatingLoader(shards, batch_size=1, seq_len=8, seed=seed, group_size=GROUP,
                            vocab_size=N_SHARDS)
    out: list[list[int]] = [[] for _ in range(passes)]
    while True:
        ids = loader.next_batch().flatten().tolist()
        if loader.epoch >= passes:
            return out, loader
        seen = out[loader.epoch]
        for i in ids:
            if not seen or seen[-1] != i:
                seen.append(i)


def test_every_shard_once_per_pass_in_a_seed_determined_order(shards):
    orders, loader = visits(shards, seed=7)
    for order in orders:
        assert sorted(order) == list(range(N_SHARDS))  # each shard once, as one contiguous run
    assert orders[0] != orders[1]  # a new order every pass
    assert orders[0] != list(range(N_SHARDS))  # shuffled, not the directory order
    again, _ = visits(shards, seed=7)
    assert again == orders  # the seed determines the order
    other, _ = visits(shards, seed=8)
    assert other[0] != orders[0] and other[1] != orders[1]
    # memory: the one buffer holds the largest group, not the corpus
    sizes = sorted((40 + (7 * i) % 23 for i in range(N_SHARDS)), reverse=True)
    assert loader.buffer.nbytes == 2 * sum(sizes[:GROUP]) < 2 * sum(sizes) / 5


@pytest.mark.slow  # a fresh Python process importing torch
def test_the_benchmark_reads_every_shard_once_and_reports_the_rise():
    result = bench_rotation(shards=6, shard_tokens=20_000, group_size=2, batch_size=4,
                            seq_len=256)
    assert result["every_shard_once"] and result["batches"] > 0
    assert result["buffer_bytes"] == result["group_bytes"] < result["corpus_bytes"]
    assert result["rss_rise_bytes"] == result["peak_rss_bytes"] - result["baseline_rss_bytes"]
    assert result["rise_over_group"] == result["rss_rise_bytes"] / result["group_bytes"]
