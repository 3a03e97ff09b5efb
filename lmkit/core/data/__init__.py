"""Training data: token shards, data directories, corpora, tokenizer training and preparation.

- ``shards``: the parameter-golf shard format; writing, validating and reading shard files.
- ``source``: a resolved data directory (:class:`DataSource`): shards, manifest and tokenizer.
- ``loader``: :class:`RotatingLoader`, batches from shard groups held in one buffer.
- ``corpus``: the :class:`Corpus` protocol, in-memory and file corpora, ``--corpus`` resolution.
- ``bpe``: training parameter-golf's SentencePiece BPE tokenizer.
- ``leaks``: document content hashes and the train/val overlap checks of ``lmkit data check``.
- ``pipeline``: corpus -> tokenizer -> shards, the prepared-once cache and ``lmkit data prepare``.

Everything public is re-exported here, so ``from lmkit.core.data import X`` is the import to use.
"""

from __future__ import annotations

from lmkit.core.data.bpe import (
    MAX_SENTENCE_BYTES,
    TOKENIZER_SAMPLE_BYTES,
    TOKENIZER_SETTINGS,
    chunk_line,
    train_tokenizer,
    trainer_sentences,
)
from lmkit.core.data.corpus import (
    Corpus,
    ListCorpus,
    PathCorpus,
    corpus_from_path,
    read_text_file,
    resolve_corpus,
)
from lmkit.core.data.leaks import (
    DOC_HASHES_NAME,
    check_data,
    format_report,
    read_doc_hashes,
    text_digest,
)
from lmkit.core.data.loader import RotatingLoader
from lmkit.core.data.pipeline import (
    DEFAULT_CORPUS,
    DEFAULT_VOCAB,
    default_data_dir,
    ensure_prepared,
    open_for_training,
    prepare,
    prepare_data,
)
from lmkit.core.data.shards import (
    HEADER_BYTES,
    HEADER_INTS,
    SHARD_MAGIC,
    SHARD_VERSION,
    SPLITS,
    find_shards,
    load_shard,
    load_stream,
    read_shard_header,
    write_shard,
)
from lmkit.core.data.source import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    DataSource,
    load_val_tokens,
    open_data,
)

__all__ = [
    "DEFAULT_CORPUS",
    "DEFAULT_VOCAB",
    "DOC_HASHES_NAME",
    "HEADER_BYTES",
    "HEADER_INTS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MAX_SENTENCE_BYTES",
    "SHARD_MAGIC",
    "SHARD_VERSION",
    "SPLITS",
    "TOKENIZER_NAME",
    "TOKENIZER_SAMPLE_BYTES",
    "TOKENIZER_SETTINGS",
    "Corpus",
    "DataSource",
    "ListCorpus",
    "PathCorpus",
    "RotatingLoader",
    "check_data",
    "chunk_line",
    "corpus_from_path",
    "default_data_dir",
    "ensure_prepared",
    "find_shards",
    "format_report",
    "load_shard",
    "load_stream",
    "load_val_tokens",
    "open_data",
    "open_for_training",
    "prepare",
    "prepare_data",
    "read_doc_hashes",
    "read_shard_header",
    "read_text_file",
    "resolve_corpus",
    "text_digest",
    "train_tokenizer",
    "trainer_sentences",
    "write_shard",
]
