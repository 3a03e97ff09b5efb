"""Options of the commands that score a model (`lmkit eval`, `lmkit pack`), defined once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

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


SCORING_OPTIONS = (
    click.option("--max-tokens", type=Count(min=1),
                 help="Score only this many targets: a deterministic prefix of the validation "
                      "stream."),
    click.option("--stride", type=int,
                 help="AR: also score sliding windows with this stride (e.g. 64)."),
    click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE",
                 help="An evaluation option of the run's objective (repeatable)."),
    click.option("--data", "data_dir", type=click.Path(path_type=Path),
                 help="Data directory, if it moved since training."),
    click.option("--device", default="auto", show_default=True),
    click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]),
                 help="Scoring precision [default: the run's train.dtype]; bf16 rounding moves a "
                      "score by ~5e-5 bpb."),
    click.option("--batch-size", type=int, help="Windows per forward pass."),
)


def scoring_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --max-tokens --stride --opt --data --device --dtype --batch-size, in that order."""
    for option in reversed(SCORING_OPTIONS):
        command = option(command)
    return command


def parse_opts(opts: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The one ``--opt key=value`` parser (objective and sampler options alike)."""
    options: dict[str, str] = {}
    for item in opts:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LmkitError(f"--opt {item!r}: expected key=value, e.g. --opt samples=8")
        options[key.strip()] = value.strip()
    return options


def objective_options(opts: tuple[str, ...], stride: int | None) -> dict[str, Any]:
    """``--opt key=value`` pairs (and ``--stride``) as the objective's evaluation options."""
    options: dict[str, Any] = parse_opts(opts)
    if stride is not None:
        options["stride"] = stride
    return options
