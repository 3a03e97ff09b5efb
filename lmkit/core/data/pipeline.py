"""Corpus -> tokenizer -> shards: preparing data directories (once, then reused) for training."""

from __future__ import annotations

import math
import os
import re
import shutil
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmkit.core import atomic
from lmkit.core.config import DataConfig
from lmkit.core.data.bpe import (
    MAX_SENTENCE_BYTES,
    TOKENIZER_SAMPLE_BYTES,
    TOKENIZER_SETTINGS,
    train_tokenizer,
)
from lmkit.core.data.corpus import Corpus, resolve_corpus
from lmkit.core.data.leaks import (
    DIGEST_BYTES,
    DOC_HASHES_NAME,
    HASH_NAME,
    NORMALIZATION,
    SHORT_NORMALIZATION,
    hashes_overlap,
    text_digest,
    write_doc_hashes,
)
from lmkit.core.data.shards import SPLITS, write_shard
from lmkit.core.data.source import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    DataSource,
    open_data,
)
from lmkit.core.registry import get_corpus
from lmkit.core.tokenizer import Tokenizer, load_processor
from lmkit.errors import LmkitError

DEFAULT_CORPUS = "sotu"
DEFAULT_VOCAB = 1024


def _safe_name(name: str) -> str:
    """A corpus name usable in file names; '_' is replaced so *_train_* globs stay unambiguous."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-.") or "corpus"


def lmkit_home() -> Path:
    """lmkit's cache: ``$LMKIT_HOME``, else ``$XDG_CACHE_HOME/lmkit``, else ``~/.cache/lmkit``."""
    if os.environ.get("LMKIT_HOME"):
        return Path(os.environ["LMKIT_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lmkit"


def default_data_dir(corpus_name: str, vocab_size: int) -> Path:
    """Where a named corpus is prepared once and reused: <lmkit home>/data/NAME-spVOCAB."""
    return lmkit_home() / "data" / f"{_safe_name(corpus_name)}-sp{vocab_size}"


def _nonempty(corpus: Corpus) -> Iterator[str]:
    return (doc for doc in corpus.documents() if doc.strip())


class _ShardWriter:
    """Streams token arrays into `{prefix}_{split}_{i:06d}.bin` files of <= shard_tokens."""

    def __init__(self, out_dir: Path, prefix: str, split: str, shard_tokens: int) -> None:
        self.out_dir, self.prefix, self.split, self.cap = out_dir, prefix, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.names: list[str] = []
        self.tokens = 0

    def add(self, toks: np.ndarray) -> None:
        self.pending.append(toks)
        self.pending_len += len(toks)
        self.tokens += len(toks)
        while self.pending_len >= self.cap:
            flat = np.concatenate(self.pending)
            self._write(flat[: self.cap])
            rest = flat[self.cap :]
            self.pending, self.pending_len = [rest], len(rest)

    def close(self) -> list[str]:
        if self.pending_len:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_len = [], 0
        return self.names

    def _write(self, toks: np.ndarray) -> None:
        name = f"{self.prefix}_{self.split}_{len(self.names):06d}.bin"
        write_shard(self.out_dir / name, toks)
        self.names.append(name)


def prepare_data(
    corpus: Corpus,
    out_dir: Path,
    *,
    tokenizer: Path | None = None,
    vocab_size: int = 1024,
    val_fraction: float = 0.05,
    split_seed: int = 0,
    shard_tokens: int = 100_000_000,
    allow_overlap: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Corpus -> (trained or given) tokenizer -> train/val shards + manifest.json; returns it.

    Streams the corpus (one pass to count and hash, one to sample for the tokenizer, one to
    encode), so memory stays bounded, and builds everything in a temp dir renamed at the end: a
    crash leaves no half-made data directory.

    Every document's text hash and split go to ``doc_hashes.bin``. A corpus with duplicate
    documents can put one copy in validation and another in training (parameter-golf's leak);
    that is refused before anything is written unless ``allow_overlap``, which records the
    overlap in the manifest instead. Duplicates are not removed: the split stays a pure function
    of the document count and ``split_seed``.
    """
    out_dir = Path(out_dir).expanduser()
    if not 0 < val_fraction < 1:
        raise LmkitError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if shard_tokens < 1:
        raise LmkitError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LmkitError(f"--out {out_dir} exists and is not empty; remove it or pick another")

    log(f"reading corpus {corpus.name}")
    doc_bytes = array("q")
    digests = bytearray()
    for doc in _nonempty(corpus):
        doc_bytes.append(len(doc.encode("utf-8")))
        digests += text_digest(doc)
    n_docs = len(doc_bytes)
    if n_docs < 2:
        raise LmkitError(f"corpus {corpus.name} has {n_docs} non-empty document(s); need >= 2")
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(split_seed).permutation(n_docs)[:n_val]] = True
    sizes = np.frombuffer(doc_bytes, dtype=np.int64)
    text_bytes = {"train": int(sizes[~is_val].sum()), "val": int(sizes[is_val].sum())}
    log(f"{n_docs} documents ({n_docs - n_val} train, {n_val} val), {sizes.sum():,} bytes")
    rows = np.frombuffer(bytes(digests), np.uint8).reshape(-1, DIGEST_BYTES)
    overlap = hashes_overlap(rows, is_val)
    if overlap.overlap_docs:
        what = (f"{overlap.overlap_docs} of {n_val} validation documents of corpus {corpus.name} "
                f"also occur in training (same text after {SHORT_NORMALIZATION}); first: document "
                f"{overlap.first_val} (val) = document {overlap.first_train} (train), counting "
                "non-empty documents from 0")
        if not allow_overlap:
            raise LmkitError(f"{what}. Deduplicate the corpus, or pass --allow-overlap to record "
                             "the overlap in manifest.json and go on")
        log(f"warning: {what}; recorded in manifest.json (--allow-overlap)")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / atomic.temp_name(out_dir.name)
    tmp.mkdir()
    try:
        write_doc_hashes(tmp / DOC_HASHES_NAME, digests, is_val)
        tok_path = tmp / TOKENIZER_NAME
        if tokenizer is not None:
            log(f"using tokenizer {tokenizer}")
            load_processor(Path(tokenizer))  # validates before copying
            shutil.copyfile(tokenizer, tok_path)
        else:
            # Train on the train split only; an even stride keeps huge corpora under the cap.
            stride = max(1, math.ceil(text_bytes["train"] / TOKENIZER_SAMPLE_BYTES))
            train_idx = np.cumsum(~is_val) - 1
            sample = (
                doc
                for i, doc in enumerate(_nonempty(corpus))
                if not is_val[i] and train_idx[i] % stride == 0
            )
            which = "the train documents" if stride == 1 else f"every {stride}th train document"
            log(f"training a {vocab_size}-piece BPE tokenizer on {which}")
            train_tokenizer(sample, tok_path, vocab_size)
        tok = Tokenizer.load(tok_path)
        vocab, bos = tok.vocab_size, tok.bos_id
        if vocab > 65536:
            raise LmkitError(f"tokenizer {tokenizer} has {vocab} ids; uint16 shards hold <= 65536")
        if bos < 0:
            raise LmkitError(f"tokenizer {tokenizer} has no BOS id; lmkit shards need one")

        prefix = _safe_name(corpus.name)
        writers = {s: _ShardWriter(tmp, prefix, s, shard_tokens) for s in SPLITS}
        log("encoding documents")
        seen = 0
        for batch_start, batch in _batched(_nonempty(corpus), 1024):
            for j, ids in enumerate(tok.processor.encode(batch, out_type=int)):
                toks = np.empty(len(ids) + 1, dtype=np.uint16)
                toks[0], toks[1:] = bos, ids
                writers["val" if is_val[batch_start + j] else "train"].add(toks)
            seen = batch_start + len(batch)
        if seen != n_docs:
            raise LmkitError(
                f"corpus {corpus.name} yielded {seen} documents on a second read but {n_docs} on "
                "the first; a corpus must yield the same documents every time"
            )
        shards = {s: w.close() for s, w in writers.items()}
        manifest = {
            "format": MANIFEST_FORMAT,
            "corpus": {"name": corpus.name, "description": corpus.description, "documents": n_docs},
            "tokenizer": {
                "file": TOKENIZER_NAME,
                "sha256": tok.sha256,
                "vocab_size": vocab,
                "bos_id": bos,
                "trained": tokenizer is None,
                "settings": None
                if tokenizer is not None
                else {
                    **TOKENIZER_SETTINGS,
                    "vocab_size": vocab_size,
                    "max_sentence_length": MAX_SENTENCE_BYTES,
                },
                "source": None if tokenizer is None else str(tokenizer),
            },
            "split": {
                "seed": split_seed,
                "val_fraction": val_fraction,
                "train_documents": n_docs - n_val,
                "val_documents": n_val,
            },
            "doc_hashes": {
                "file": DOC_HASHES_NAME,
                "hash": HASH_NAME,
                "normalization": NORMALIZATION,
                "train_documents": overlap.train_docs,
                "val_documents": overlap.val_docs,
                "overlap_documents": overlap.overlap_docs,
                "val_duplicates": overlap.val_duplicates,
                "allow_overlap": allow_overlap,
            },
            "tokens": {s: w.tokens for s, w in writers.items()},
            "text_bytes": text_bytes,
            "shards": shards,
        }
        # last: its presence means "complete"
        atomic.write_json(tmp / MANIFEST_NAME, manifest, indent=2)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir}: {manifest['tokens']['train']:,} train / "
        f"{manifest['tokens']['val']:,} val tokens")
    return manifest


def _batched(docs: Iterable[str], size: int) -> Iterator[tuple[int, list[str]]]:
    batch: list[str] = []
    start = 0
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield start, batch
            start, batch = start + size, []
    if batch:
        yield start, batch


def ensure_prepared(
    corpus: Corpus,
    *,
    vocab_size: int = 1024,
    out_dir: Path | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> Path:
    """Prepare a corpus once into its cache directory and reuse it afterwards."""
    out_dir = Path(out_dir) if out_dir is not None else default_data_dir(corpus.name, vocab_size)
    if (out_dir / MANIFEST_NAME).is_file():
        return out_dir
    try:
        prepare_data(corpus, out_dir, vocab_size=vocab_size, log=log)
    except LmkitError:
        if (out_dir / MANIFEST_NAME).is_file():  # another process finished it first
            return out_dir
        raise
    return out_dir


def prepare(
    spec: str,
    *,
    out: Path | None = None,
    tokenizer: Path | None = None,
    vocab_size: int = DEFAULT_VOCAB,
    val_fraction: float = 0.05,
    split_seed: int = 0,
    shard_tokens: int = 100_000_000,
    allow_overlap: bool = False,
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
                            shard_tokens=shard_tokens, allow_overlap=allow_overlap, log=log)
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
    from lmkit.core import distributed

    with distributed.local_main_first():  # under torchrun: each node's first rank prepares
        prepared = ensure_prepared(corpus, vocab_size=DEFAULT_VOCAB, log=log or (lambda s: None))
    return open_data(prepared, tokenizer)
