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

    The stream is one sequence of micro-batches of batch_size*seq_len + 1 tokens (consecutive
    ones overlap by one token; a group's tail too short for one is skipped), the same whatever
    the number of ranks. A call reads the micro-batch at the cursor + rank and moves the cursor
    on by world_size micro-batches: ranks see disjoint targets, and together the same
    micro-batches one process sees in world_size calls. The cursor (the saved state) is the
    same on every rank, so a run resumes on any number of ranks.
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
        self.local = batch_size * seq_len  # targets of one micro-batch
        self.tokens_per_step = self.local * world_size  # targets of one call, all ranks together
        self.span = self.local + 1
        self._check_fits()
        # The one buffer: big enough for the largest group any epoch can draw.
        largest = sum(sorted(self.sizes, reverse=True)[: self.group_size])
        self.buffer = np.empty(largest, dtype=np.uint16)
        self.epoch, self.group, self.offset = 0, 0, 0
        self._loaded: tuple[int, int] | None = None  # (epoch, group) now in the buffer
        self._validated: set[Path] = set()
        self._orders: dict[int, list[list[int]]] = {}

    def _check_fits(self) -> None:
        """Fail now, not mid-run, if some group an epoch can draw is shorter than one span."""
        n, g = len(self.shards), self.group_size
        smallest_group = n % g or g
        least = sum(sorted(self.sizes)[:smallest_group])
        if least < self.span:
            raise LmkitError(
                f"data too small: a group of {smallest_group} shard(s) can hold as few as {least} "
                f"tokens, less than one micro-batch's span of {self.span} "
                f"(batch_size*seq_len + 1); lower batch_size or seq_len"
                + ("" if self.single_group else ", or raise group_size (0 = all shards)")
            )

    def _group_order(self, epoch: int) -> list[list[int]]:
        if self.single_group:
            return [list(range(len(self.shards)))]
        if epoch not in self._orders:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            g = self.group_size
            self._orders = {epoch: [perm[i : i + g].tolist() for i in range(0, len(perm), g)]}
        return self._orders[epoch]

    def _group_len(self, epoch: int, group: int) -> int:
        """Tokens of a group, from the shard headers (nothing is read)."""
        return sum(self.sizes[i] for i in self._group_order(epoch)[group])

    def _ensure_loaded(self, epoch: int, group: int) -> None:
        key = (0, 0) if self.single_group else (epoch, group)
        if self._loaded == key:
            return
        pos = 0
        for i in self._group_order(epoch)[group]:
            part = load_shard(self.shards[i], out=self.buffer[pos:])
            if self.shards[i] not in self._validated:
                _check_ids(part, self.vocab_size, self.shards[i])
                self._validated.add(self.shards[i])
            pos += len(part)
        if pos < self.span:  # unreachable after _check_fits unless files changed underneath
            raise LmkitError(f"data too small for batch_size*seq_len: group holds {pos} tokens")
        self._loaded = key

    def _fit(self, pos: tuple[int, int, int]) -> tuple[int, int, int]:
        """The first micro-batch at or after ``pos`` (epoch, group, offset) that fits its group."""
        epoch, group, offset = pos
        while offset + self.span > self._group_len(epoch, group):
            group, offset = group + 1, 0
            if group >= len(self._group_order(epoch)):
                epoch, group = epoch + 1, 0
        return epoch, group, offset

    def _skip(self, pos: tuple[int, int, int], n: int) -> tuple[int, int, int]:
        """The position ``n`` micro-batches after ``pos``."""
        for _ in range(n):
            epoch, group, offset = self._fit(pos)
            pos = (epoch, group, offset + self.local)
        return pos

    def next_batch(self) -> torch.Tensor:
        """int64 [batch_size, seq_len + 1]; rows overlap by one token (x=row[:-1], y=row[1:])."""
        cursor = (self.epoch, self.group, self.offset)
        epoch, group, start = self._fit(self._skip(cursor, self.rank))
        self._ensure_loaded(epoch, group)
        sub = torch.from_numpy(self.buffer[start : start + self.span].astype(np.int64))
        self.epoch, self.group, self.offset = self._skip(cursor, self.world_size)
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
