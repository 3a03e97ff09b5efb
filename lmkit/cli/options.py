"""Options of the commands that score a model (`lmkit eval`, `lmkit pack`), defined once."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from lmkit.core.defaults import DEFAULT_CALIB_TOKENS
from lmkit.errors import LmkitError


class Count(click.ParamType):
    """An integer option that also takes 1e6, 1_000_000, 1.5M or 2k."""

    name = "count"

    def __init__(self, min: int | None = None):
        self.min = min

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        from lmkit.core.units import parse_count

        try:
            count = parse_count(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if self.min is not None and count < self.min:
            self.fail(f"{count} is smaller than the minimum {self.min}", param, ctx)
        return count


class Finite(click.ParamType):
    """A float option that must be finite and within [min, max] (click's FloatRange lets NaN
    through, which then silently disables every comparison)."""

    name = "float"

    def __init__(self, min: float | None = None, max: float | None = None):
        self.min, self.max = min, max

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        import math

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if (self.min is not None and number < self.min) or (
                self.max is not None and number > self.max):
            self.fail(f"{number:g} is not in the range {self.min:g}..{self.max:g}", param, ctx)
        return number


# Upper bounds of counts people type: far above any real use, below what runs for days.
MAX_BATCH = 1 << 16
MAX_STRIDE = 1 << 20
MAX_SAMPLES = 100_000
MAX_LENGTH = 1 << 20
MAX_SAMPLER_STEPS = 100_000
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit seed


def bounded(lo: int, hi: int) -> click.IntRange:
    return click.IntRange(min=lo, max=hi)


SCORING_OPTIONS = (
    click.option("--max-tokens", type=Count(min=1),
                 help="Score only this many targets: a deterministic prefix of the validation "
                      "stream [default: all of it]."),
    click.option("--stride", type=bounded(1, MAX_STRIDE),
                 help="AR: also score sliding windows with this stride (e.g. 64)."),
    click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE",
                 help="An evaluation option of the run's objective (repeatable)."),
    click.option("--data", "data_dir", type=click.Path(path_type=Path),
                 help="Data directory, if it moved since training."),
    click.option("--device", default="auto", show_default=True),
    click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]),
                 help="Scoring precision [default: the run's train.dtype]; bf16 rounding moves a "
                      "score by ~5e-5 bpb."),
    click.option("--batch-size", type=bounded(1, MAX_BATCH), help="Windows per forward pass."),
)


def scoring_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --max-tokens --stride --opt --data --device --dtype --batch-size, in that order."""
    for option in reversed(SCORING_OPTIONS):
        command = option(command)
    return command


def parse_opts(opts: tuple[str, ...] | list[str], flag: str = "--opt") -> dict[str, str]:
    """The one ``--opt key=value`` parser (objective and sampler options alike); ``flag`` names
    the option in the error."""
    options: dict[str, str] = {}
    for item in opts:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LmkitError(f"{flag} {item!r}: expected key=value, e.g. {flag} samples=8")
        options[key.strip()] = value.strip()
    return options


def objective_options(opts: tuple[str, ...], stride: int | None) -> dict[str, Any]:
    """``--opt key=value`` pairs (and ``--stride``) as the objective's evaluation options."""
    options: dict[str, Any] = parse_opts(opts)
    if stride is not None:
        options["stride"] = stride
    return options


# `lmkit eval` and `lmkit export` score with the same Monte-Carlo seed option
estimator_seed_option = click.option(
    "--seed", type=bounded(0, MAX_SEED),
    help="Seed of the Monte-Carlo estimators [default: the run's].")


# `lmkit pack`, `lmkit record` and `lmkit bench pack` calibrate GPTQ with the same option
def calib_tokens_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--calib-tokens", type=Count(min=1), default=DEFAULT_CALIB_TOKENS, show_default=True,
        help="Training tokens for GPTQ's Hessians (training shards, never validation).")(command)


def single_process(command: str) -> None:
    """Refuse ``command`` under a multi-rank torchrun (one line from rank 0): it does not split
    its work over ranks, so N copies would each write the same files. Torch-free otherwise."""
    if "WORLD_SIZE" in os.environ:
        from lmkit.core import distributed

        distributed.require_single_process(command)


class SingleProcessGroup(click.Group):
    """A command group whose every subcommand is :func:`single_process`: the check runs once
    the subcommand's arguments are parsed, so ``--help`` still answers under torchrun."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        callback = cmd.callback
        if callback is not None:
            @functools.wraps(callback)
            def guarded(*args: Any, **kwargs: Any) -> Any:
                single_process(f"{self.name} {cmd.name}")
                return callback(*args, **kwargs)

            cmd.callback = guarded
        super().add_command(cmd, name)
