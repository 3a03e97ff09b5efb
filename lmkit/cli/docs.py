"""Generate docs/cli.md from the commands' own --help, so the docs cannot drift from the code.

Regenerate with ``python -m lmkit.cli.docs > docs/cli.md``; a test fails when they differ.
"""

from __future__ import annotations

import click

from lmkit.cli import cli


def _walk(command: click.Command, path: list[str]):
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.list_commands(click.Context(command))):
            yield from _walk(command.get_command(click.Context(command), name), [*path, name])


def render() -> str:
    parts = ["# lmkit command reference\n",
             "Generated from `--help` by `python -m lmkit.cli.docs > docs/cli.md`; do not edit.\n"]
    for path, command in _walk(cli, ["lmkit"]):
        ctx = click.Context(command, info_name=" ".join(path), terminal_width=100,
                            max_content_width=100)
        parts.append(f"\n## `{' '.join(path)}`\n\n```\n{command.get_help(ctx)}\n```\n")
    return "".join(parts)


if __name__ == "__main__":
    print(render(), end="")
