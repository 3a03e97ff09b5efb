"""Docs generated from --help must match the code."""

from pathlib import Path

from lmkit.cli.docs import render

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_is_up_to_date():
    assert DOCS.read_text() == render(), (
        "docs/cli.md is stale: run `python -m lmkit.cli.docs > docs/cli.md`"
    )
