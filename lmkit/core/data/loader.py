"""The rotating training loader: batches from shard groups held in one preallocated buffer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmkit.core.data.shards import _check_ids, load_shard, read_shard_header
from lmkit.errors import LmkitError


class RotatingLoader:
    """Batches from shard groups held one at a time in a single preallocated buffer.

    Each epoch permutes the shards (seeded by (seed, epoch)) and cuts the permutation into
    groups of `group_size`; that is how a corpus larger than RAM is still visited in full.
    A step takes one contiguous global span of world_size*batch_size*seq_len + 1 tokens;
    rank r reads its own batch_size*seq_len + 1 slice, so ranks see disjoint targets.
    """

    def __init__(
        self,
        shards: list[Path],
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        group_size: int = 0,
        vocab_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not shards:
            raise LmkitError("no training shards given to the loader; check --data")
        if batch_size < 1 or seq_len < 1:
            raise LmkitError(f"batch_size and seq_len must be >= 1 (got {batch_size}, {seq_len})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if group_size < 0:
            raise LmkitError(f"group_size must be >= 0 (0 = all shards), got {group_size}")
        self.shards = [Path(p) for p in shards]
        self.sizes = [read_shard_header(p) for p in self.shards]
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.vocab_size = rank, world_size, vocab_size
        n = len(self.shards)
        self.group_size = n if group_size == 0 or group_size >= n else group_size
        self.single_group = self.group_size == n
        self.tokens_per_step = batch_size * seq_len * world_size
        self.span = self.tokens_per_step + 1
        self._check_fits()
        # The one buffer: big enough for the largest group any epoch can draw.
        largest = sum(sorted(self.sizes, reverse=True)[: self.group_size])
        self.buffer = np.empty(largest, dtype=np.uint16)
        self.epoch, self.group, self.offset = 0, 0, 0
        self._loaded: tuple[int, int] | None = None  # (epoch, group) now in the buffer
        self._group_len = 0
        self._validated: set[Path] = set()

    def _check_fits(self) -> None:
        """Fail now, not mid-run, if some group an epoch can draw is shorter than one span."""
        n, g = len(self.shards), self.group_size
        smallest_group = n % g or g
        least = sum(sorted(self.sizes)[:smallest_group])
        if least < self.span:
            raise LmkitError(
                f"data too small: a group of {smallest_group} shard(s) can hold as few as {least} "
                f"tokens, less than one step's span of {self.span} "
                f"(world_size*batch_size*seq_len + 1); lower batch_size or seq_len"
                + ("" if self.single_group else ", or raise group_size (0 = all shards)")
            )

    def _group_order(self, epoch: int) -> list[list[int]]:
        if self.single_group:
            return [list(range(len(self.shards)))]
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        g = self.group_size
        return [perm[i : i + g].tolist() for i in range(0, len(perm), g)]

    def _ensure_loaded(self) -> None:
        key = (0, 0) if self.single_group else (self.epoch, self.group)
        if self._loaded == key:
            return
        pos = 0
        for i in self._group_order(self.epoch)[self.group]:
            part = load_shard(self.shards[i], out=self.buffer[pos:])
            if self.shards[i] not in self._validated:
                _check_ids(part, self.vocab_size, self.shards[i])
                self._validated.add(self.shards[i])
            pos += len(part)
        if pos < self.span:  # unreachable after _check_fits unless files changed underneath
            raise LmkitError(f"data too small for batch_size*seq_len: group holds {pos} tokens")
        self._loaded, self._group_len = key, pos

    def _advance_group(self) -> None:
        self.group, self.offset = self.group + 1, 0
        if self.group >= len(self._group_order(self.epoch)):
            self.epoch, self.group = self.epoch + 1, 0

    def next_batch(self) -> torch.Tensor:
        """int64 [batch_size, seq_len + 1]; rows overlap by one token (x=row[:-1], y=row[1:])."""
        while True:
            self._ensure_loaded()
            if self.offset + self.span <= self._group_len:
                break
            self._advance_group()
        local = self.batch_size * self.seq_len
        start = self.offset + self.rank * local
        sub = torch.from_numpy(self.buffer[start : start + local + 1].astype(np.int64))
        self.offset += self.tokens_per_step
        return sub.unfold(0, self.seq_len + 1, self.seq_len).contiguous()

    def state_dict(self) -> dict:
        """JSON-serialisable position; with the same shards and seed it resumes exactly."""
        return {
            "epoch": self.epoch,
            "group": self.group,
            "offset": self.offset,
            "seed": self.seed,
            "group_size": self.group_size,
            "shards": [p.name for p in self.shards],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuse a state recorded over other shards, seed or grouping."""
        names = [p.name for p in self.shards]
        for key, mine in (("shards", names), ("seed", self.seed), ("group_size", self.group_size)):
            if state.get(key) != mine:
                raise LmkitError(
                    f"cannot resume the data loader: its saved {key} ({state.get(key)!r}) differs "
                    f"from this run's ({mine!r}); resume with the same --data and seed"
                )
        self.epoch, self.group, self.offset = (int(state[k]) for k in ("epoch", "group", "offset"))
