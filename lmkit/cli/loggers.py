"""``lmkit loggers``: the metric sinks ``lmkit train --log`` can feed."""

from __future__ import annotations

import click


@click.command("loggers")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of the loggers.")
def loggers_command(as_json: bool) -> None:
    """List the registered loggers: metric sinks fed every metrics.jsonl record.

    metrics.jsonl is always written; a logger is added with --log (or the config key
    train.log), each behind its own extra.

    \b
    Example:
      pip install 'lmkit[trackio,tensorboard]'
      lmkit train --preset tiny --log trackio,tensorboard --out runs/ar-tiny
    """
    from lmkit.cli import _list_entries

    _list_entries("logger", as_json)
