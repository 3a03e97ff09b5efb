"""``lmkit bench rotation``: the rotating loader's resident memory over a corpus of many shards.

Writes ``shards`` synthetic shards into a temporary directory, then a fresh Python process
builds a :class:`~lmkit.core.data.RotatingLoader` holding ``group_size`` of them at a time and
draws batches for one full pass. That process resets its peak resident memory after its imports
(Linux ``/proc/self/clear_refs``), reads its resident memory, and reads the peak again after the
pass; the rise is set beside the bytes of one group (the loader's buffer: the ``group_size``
largest shards) and of the whole corpus. The child also
records every shard it reads, so the pass is checked to read each shard exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmkit.core import jsonfile
from lmkit.core.data.shards import write_shard
from lmkit.core.memory import peak_rss_bytes
from lmkit.errors import LmkitError


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def _rss_bytes(peak: bool) -> int:
    """Current (``peak=False``) or peak resident memory; without /proc, ru_maxrss (peak only)."""
    kb = _status_kb("VmHWM" if peak else "VmRSS")
    return peak_rss_bytes() if kb is None else kb * 1024


def child_pass(shard_dir: str, group_size: int, batch_size: int, seq_len: int,
               seed: int) -> dict[str, Any]:
    """One pass of the loader over ``shard_dir``, run in a fresh process so that its peak RSS is
    the loader's, not the parent's; the shards it reads are recorded as it reads them."""
    import torch  # noqa: F401  (the trainer's imports, so the baseline includes them)

    import lmkit.core.data.loader as loader_mod
    from lmkit.core.data import RotatingLoader, find_shards

    shards = find_shards(Path(shard_dir), "train")
    read: list[tuple[int, str]] = []  # (pass, shard) in the order the loader reads them
    real_load, real_ensure = loader_mod.load_shard, RotatingLoader._ensure_loaded
    loading: list[int] = [0]  # the pass of the group being loaded (the loader's cursor may
    # still point at the previous pass's end when it loads the next pass's first group)

    def recording_ensure(self: RotatingLoader, epoch: int, group: int) -> None:
        loading[0] = epoch
        real_ensure(self, epoch, group)

    def recording_load(path: Path, out: Any = None) -> Any:
        read.append((loading[0], Path(path).name))
        return real_load(path, out=out)

    loader_mod.load_shard = recording_load
    RotatingLoader._ensure_loaded = recording_ensure  # type: ignore[method-assign]
    reset = _reset_peak()  # else the imports' transient peak would hide the loader's memory
    before = _rss_bytes(peak=not reset)
    t0 = time.perf_counter()
    loader = RotatingLoader(shards, batch_size=batch_size, seq_len=seq_len, seed=seed,
                            group_size=group_size)
    batches = 0
    while True:
        loader.next_batch()
        if loader.epoch > 0:  # this batch came from the next pass's first group
            break
        batches += 1
    names = [p.name for p in shards]
    first_pass = [name for epoch, name in read if epoch == 0]
    return {"baseline_rss": before, "peak_rss": _rss_bytes(peak=True), "peak_reset": reset,
            "batches": batches,
            "buffer_bytes": int(loader.buffer.nbytes), "seconds": time.perf_counter() - t0,
            "visited": [names.index(n) for n in first_pass]}


def bench_rotation(*, shards: int = 40, shard_tokens: int = 4_000_000, group_size: int = 4,
                   batch_size: int = 64, seq_len: int = 1024, seed: int = 1337,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Peak RSS of one loader pass over ``shards`` synthetic shards against one group's bytes."""
    if shards < 2 or not 1 <= group_size < shards:
        raise LmkitError(f"--shards {shards} / --group-size {group_size}: need at least 2 "
                         "shards and 1 <= group size < shards (rotation is what is measured)")
    if shard_tokens < batch_size * seq_len + 1:
        raise LmkitError(f"--shard-tokens {shard_tokens} is less than one batch "
                         f"({batch_size}×{seq_len} + 1 tokens)")
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="lmkit-rotation-") as tmp:
        sizes = []
        for i in range(shards):
            n = shard_tokens - int(rng.integers(0, shard_tokens // 10 + 1))  # unequal sizes
            tokens = rng.integers(0, 1024, size=n, dtype=np.uint16)
            write_shard(Path(tmp) / f"bench_train_{i:06d}.bin", tokens)
            sizes.append(n)
        if log:
            log(f"wrote {shards} shards, {sum(sizes):,} tokens ({2 * sum(sizes) / 1e6:,.0f} MB); "
                f"one pass holding {group_size} at a time…")
        root = str(Path(__file__).resolve().parents[3])
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        code = ("import sys; from lmkit.core.jsonfile import dumps, loads; "
                "from lmkit.core.bench.rotation import child_pass; "
                "print(dumps(child_pass(*loads(sys.argv[1], \"argv\"))))")
        args = jsonfile.dumps([tmp, group_size, batch_size, seq_len, seed])
        proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True,
                              text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise LmkitError(f"the rotation benchmark's child process failed: {tail}")
        child = jsonfile.loads(proc.stdout.strip().splitlines()[-1], "the child's report")
    group_bytes = 2 * sum(sorted(sizes, reverse=True)[:group_size])
    rise = child["peak_rss"] - child["baseline_rss"]
    visited = child.pop("visited")
    return {
        "benchmark": "rotation", "shards": shards, "group_size": group_size,
        "shard_tokens": shard_tokens, "batch_tokens": batch_size * seq_len,
        "corpus_bytes": 2 * sum(sizes), "group_bytes": group_bytes,
        "buffer_bytes": child["buffer_bytes"], "baseline_rss_bytes": child["baseline_rss"],
        "peak_rss_bytes": child["peak_rss"], "rss_rise_bytes": rise,
        "rise_over_group": rise / group_bytes, "rise_over_corpus": rise / (2 * sum(sizes)),
        "batches": child["batches"], "peak_reset": child["peak_reset"],
        "every_shard_once": sorted(visited) == list(range(shards)),
        "seconds": round(child["seconds"], 3),
        "note": "peak resident memory of a fresh process during one loader pass minus its "
                "resident memory after its imports (peak reset through /proc/self/clear_refs "
                "where Linux allows; else ru_maxrss), against one group (the group_size largest "
                "shards)",
    }
