"""Generate docs/cli.md from the commands' own --help, so the docs cannot drift from the code.

Regenerate with ``python -m lmkit.cli.docs > docs/cli.md``; a test fails when they differ.
"""

from __future__ import annotations

import click

from lmkit.cli import cli


def _walk(command: click.Command, ctx: click.Context):
    """Yield (context, command) for the group and every subcommand, as the real --help sees them
    (child contexts inherit the parent's settings, e.g. ``-h``)."""
    yield ctx, command
    if isinstance(command, click.Group):
        for name in sorted(command.list_commands(ctx)):
            sub = command.get_command(ctx, name)
            yield from _walk(sub, click.Context(sub, info_name=name, parent=ctx))


def render() -> str:
    parts = ["# lmkit command reference\n",
             "Generated from `--help` by `python -m lmkit.cli.docs > docs/cli.md`; do not edit.\n"]
    root = click.Context(cli, info_name="lmkit", terminal_width=100, max_content_width=100,
                         **{k: v for k, v in cli.context_settings.items()
                            if k != "max_content_width"})
    for ctx, command in _walk(cli, root):
        # click caches each command's help option from the first context that asked for it
        # (a test may have invoked a command on its own); rebuild it from this context chain.
        command._help_option = None
        parts.append(f"\n## `{ctx.command_path}`\n\n```\n{command.get_help(ctx)}\n```\n")
    return "".join(parts)


if __name__ == "__main__":
    print(render(), end="")
