"""Named corpora and paths resolved to prepared shard directories (prepared once, then reused)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmkit.core.config import DataConfig
from lmkit.core.data import (
    MANIFEST_NAME,
    Corpus,
    DataSource,
    corpus_from_path,
    default_data_dir,
    ensure_prepared,
    open_data,
    prepare_data,
)
from lmkit.core.registry import get_corpus, get_registry
from lmkit.errors import LmkitError

DEFAULT_CORPUS = "sotu"
DEFAULT_VOCAB = 1024


def resolve_corpus(spec: str) -> Corpus:
    """A registered corpus name, else a path to text/jsonl data."""
    if spec in get_registry().entries["corpus"]:
        return get_corpus(spec).obj
    path = Path(spec).expanduser()
    if path.exists():
        return corpus_from_path(path)
    known = ", ".join(sorted(get_registry().entries["corpus"])) or "none"
    raise LmkitError(f"--corpus {spec!r} is neither a registered corpus ({known}) nor a path")


def prepare(
    spec: str,
    *,
    out: Path | None = None,
    tokenizer: Path | None = None,
    vocab_size: int = DEFAULT_VOCAB,
    val_fraction: float = 0.05,
    split_seed: int = 0,
    shard_tokens: int = 100_000_000,
    force: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """``lmkit data prepare``: returns the manifest, with ``dir`` added."""
    corpus = resolve_corpus(spec)
    out_dir = Path(out) if out else default_data_dir(corpus.name, vocab_size)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise LmkitError(f"--tokenizer {tokenizer} does not exist")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise LmkitError(f"{out_dir} already holds prepared data; pass --force to replace it "
                             f"or --out to write elsewhere")
        if not (out_dir / MANIFEST_NAME).exists():
            raise LmkitError(f"--force refuses to delete {out_dir}: it is not an lmkit data "
                             f"directory (no {MANIFEST_NAME})")
        shutil.rmtree(out_dir)
    manifest = prepare_data(corpus, out_dir, tokenizer=tokenizer, vocab_size=vocab_size,
                            val_fraction=val_fraction, split_seed=split_seed,
                            shard_tokens=shard_tokens, log=log)
    return {**manifest, "dir": str(out_dir)}


def open_for_training(data: DataConfig, log: Callable[[str], None] | None = None) -> DataSource:
    """The configured shard directory, or the default corpus prepared into the cache once."""
    tokenizer = Path(data.tokenizer) if data.tokenizer else None
    if data.path:
        return open_data(Path(data.path).expanduser(), tokenizer)
    corpus = get_corpus(DEFAULT_CORPUS).obj
    target = default_data_dir(corpus.name, DEFAULT_VOCAB)
    if not (target / MANIFEST_NAME).is_file() and log:
        log(f"preparing the default corpus {corpus.name!r} into {target} (once)…")
    return open_data(ensure_prepared(corpus, vocab_size=DEFAULT_VOCAB, log=log or (lambda s: None)),
                     tokenizer)
