"""Data-parallel ranks under ``torchrun``: the process group, who writes, and the few collectives
training and evaluation share.

lmkit writes no launcher and no communication layer: ``torchrun`` starts the processes (one node
or many, through its rendezvous) and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`session` turns them into a ``torch.distributed`` process group (gloo for CPU tensors,
plus NCCL for CUDA tensors where CUDA exists) and tears it down. Without those variables
everything here is the single-process identity: rank 0 of 1, no collective is called.

The design rule that makes N ranks train exactly what one process trains: a step is a fixed
global list of ``accum`` micro-batches (``batch_geometry``); rank r of N takes micro-batches
r, r+N, r+2N, ... (the loader's striding), the random draws of micro-batch i come from a seed
keyed by (seed, step, i) (:func:`seed_micro_batch`), and gradients are summed over ranks before
the optimizer step. Only the order of floating-point sums differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lmkit.errors import LmkitError

T = TypeVar("T")
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun told this process about its place in the job."""

    rank: int
    world_size: int
    local_rank: int


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """torchrun's variables, or None when this process was not launched by it."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    try:
        rank, world, local = (int(env.get(k, "0")) for k in ENV_KEYS)
    except ValueError:
        shown = ", ".join(f"{k}={env.get(k)!r}" for k in ENV_KEYS)
        raise LmkitError(f"torchrun environment is not numeric ({shown}); launch with "
                         "`torchrun --nproc-per-node N -m lmkit ...`") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise LmkitError(f"torchrun environment is inconsistent: RANK={rank}, "
                         f"WORLD_SIZE={world}, LOCAL_RANK={local}")
    return LaunchEnv(rank, world, local)


def backend() -> str:
    """gloo for CPU tensors, and NCCL for CUDA tensors when this machine has CUDA: one group
    serves a ``--device cpu`` run and a GPU run alike."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def session(environ: Mapping[str, str] | None = None) -> Iterator[LaunchEnv | None]:
    """Join torchrun's process group for the body (nothing outside torchrun, or when a group
    already exists); each rank's default CUDA device is its ``LOCAL_RANK``."""
    env = launch_env(environ)
    if env is None or env.world_size == 1 or dist.is_initialized():
        yield env
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    try:
        dist.init_process_group(backend(), rank=env.rank, world_size=env.world_size)
    except (ValueError, RuntimeError) as exc:  # e.g. WORLD_SIZE set by hand, no MASTER_ADDR
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LmkitError(f"could not join torchrun's process group (WORLD_SIZE="
                         f"{env.world_size}, RANK={env.rank}): {reason}; start lmkit with "
                         "torchrun, or unset WORLD_SIZE to run in one process") from None
    try:
        yield env
    finally:
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 writes files, logs and shows progress; the others only compute."""
    return rank() == 0


def is_local_main() -> bool:
    """The first rank of its node (prepares node-local caches)."""
    return not active() or int(os.environ.get("LOCAL_RANK", "0")) == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (e.g. a run directory named after rank 0's clock)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


class MainRankError(LmkitError):
    """A user error rank 0 raised, raised again on another rank (rank 0 reports it)."""


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only; a user error it raises is raised on every rank (the others
    raise :class:`MainRankError`), so no rank is left waiting in a collective."""
    if not active():
        return fn()
    failure: LmkitError | None = None
    result: T | None = None
    if is_main():
        try:
            result = fn()
        except LmkitError as exc:
            failure = exc
    message = broadcast_object(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise MainRankError(message)
    return result


def from_main(fn: Callable[[], T]) -> T:
    """:func:`on_main`, and rank 0's result on every rank (it must pickle): work one rank does
    for all, e.g. writing a file the others then read (the broadcast is their barrier)."""
    return broadcast_object(on_main(fn))


RANK_AWARE = ("train", "eval", "compare")  # the commands that split their work over ranks


def require_single_process(command: str) -> None:
    """Refuse, before anything is read or written, a command that does not split its work over
    ranks when torchrun started several: N copies would each write the same files. Rank 0
    says so in one line; the other ranks exit quietly (:class:`MainRankError`)."""
    if not active():
        return
    message = (f"`lmkit {command}` runs in one process, and torchrun started {world_size()}: "
               f"run it without torchrun (only {', '.join(RANK_AWARE)} split their work over "
               "ranks)")
    raise LmkitError(message) if is_main() else MainRankError(message)


class _MainOnly:
    """A proxy whose named methods do nothing on ranks other than 0."""

    def __init__(self, target: Any, methods: tuple[str, ...]):
        self._target, self._methods = target, methods

    def __getattr__(self, name: str) -> Any:
        if name in self._methods and not is_main():
            return lambda *args, **kwargs: None
        return getattr(self._target, name)


def main_only(target: T, *methods: str) -> T:
    """``target`` with ``methods`` (its writers) silenced on ranks other than 0."""
    return target if is_main() else _MainOnly(target, methods)  # type: ignore[return-value]


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """The body runs on each node's first rank, then on the others (a cache the first fills)."""
    if not active():
        yield
        return
    if not is_local_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_local_main():
            dist.barrier()


def split_accum(accum: int, world: int | None = None) -> int:
    """Micro-batches per rank per step: the global batch stays ``accum`` micro-batches."""
    world = world_size() if world is None else world
    if accum % world:
        raise LmkitError(
            f"a step of {accum} micro-batch(es) cannot be split evenly over {world} ranks: the "
            f"global batch is fixed, so the number of ranks must divide it; set "
            f"train.micro_batch so that batch_tokens/seq_len/micro_batch is a multiple of "
            f"{world}, or launch a number of ranks that divides {accum}")
    return accum // world


def micro_index(local: int) -> int:
    """The global index within a step of this rank's ``local``-th micro-batch."""
    return local * world_size() + rank()


def micro_seed(seed: int, step: int, index: int) -> int:
    """The 63-bit seed of micro-batch ``index`` of optimizer step ``step``."""
    digest = hashlib.blake2b(f"lmkit-train\0{seed}\0{step}\0{index}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_micro_batch(seed: int, step: int, index: int) -> None:
    """Seed the global generators for one micro-batch: an objective's random draws (mask
    rates, times) then depend on which micro-batch it is, not on how many ranks came before."""
    torch.manual_seed(micro_seed(seed, step, index))


def sum_gradients(model: torch.nn.Module) -> None:
    """Average the gradients over ranks (each rank's are its micro-batches' mean), one flat
    all-reduce per dtype and device. A parameter with a gradient on some rank gets zeros where
    it has none, so every rank steps the same parameters."""
    world = world_size()
    if world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    have = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(have, op=dist.ReduceOp.MAX)
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p, h in zip(params, have.tolist(), strict=True):
        if not h:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def sum_step_stats(loss_sum: torch.Tensor, metrics: dict[str, float], tokens: int
                   ) -> tuple[torch.Tensor, dict[str, float], int]:
    """The step's loss sum, loss-metric sums and trained tokens over all ranks (one all-reduce)."""
    if world_size() == 1:
        return loss_sum, metrics, tokens
    keys = sorted(metrics)
    packed = torch.cat([loss_sum.detach().double().reshape(1),
                        torch.tensor([float(tokens), *(metrics[k] for k in keys)],
                                     dtype=torch.float64, device=loss_sum.device)])
    dist.all_reduce(packed)
    values = packed.tolist()
    return (packed[0].to(loss_sum.dtype), dict(zip(keys, values[2:], strict=True)),
            int(values[1]))


def agree_step(seconds: float, stop: bool) -> tuple[float, bool]:
    """Rank 0's training clock, and whether any rank was asked to stop: every rank then ends
    (or checkpoints) at the same step."""
    if world_size() == 1:
        return seconds, stop
    packed = torch.tensor([seconds if is_main() else 0.0, float(stop)], dtype=torch.float64)
    dist.all_reduce(packed)
    return float(packed[0]), bool(packed[1] > 0)


def shard_of(n: int, rank: int, world: int, batch: int = 1) -> range:
    """Rank ``rank``'s contiguous share of ``n`` items in whole batches of ``batch``: the shares
    of all ranks partition range(n) in order, differ by at most one batch, and start on batch
    boundaries, so every batch holds the items one process would batch together (and a
    model's float32 results per item do not change with the split)."""
    batches = -(-n // batch)
    lo, hi = batches * rank // world, batches * (rank + 1) // world
    return range(min(lo * batch, n), min(hi * batch, n))


def shard(n: int, batch: int = 1) -> range:
    """This rank's contiguous share of ``n`` work items, in whole batches of ``batch`` (all of
    them on one process)."""
    return shard_of(n, rank(), world_size(), batch)


def all_sum(*tensors: torch.Tensor) -> None:
    """Sum tensors over ranks in place (each rank filled its own rows, zeros elsewhere)."""
    if world_size() == 1:
        return
    for t in tensors:
        dist.all_reduce(t)


def describe() -> dict[str, Any]:
    """What a run's environment records about its ranks."""
    return {"world_size": world_size(), "backend": dist.get_backend() if active() else None}
