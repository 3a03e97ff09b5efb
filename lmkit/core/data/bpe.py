"""Tokenizer training: parameter-golf's SentencePiece BPE, fed lines the trainer will not skip."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from lmkit.core import atomic
from lmkit.errors import LmkitError

# parameter-golf's SentencePiece trainer settings (vocab_size is an argument).
TOKENIZER_SETTINGS: dict = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "hard_vocab_limit": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
}
MAX_SENTENCE_BYTES = 4192  # SentencePiece's max_sentence_length default; longer lines are dropped
TOKENIZER_SAMPLE_BYTES = 200_000_000
_WHITESPACE = b" \t\r\n\f\v"


def chunk_line(line: str, limit: int = MAX_SENTENCE_BYTES) -> list[str]:
    """Split a line into pieces of <= limit UTF-8 bytes whose concatenation is the line.

    Cuts after the last whitespace that fits, else at the last character boundary, so the
    SentencePiece trainer (which silently skips longer lines) sees all of the text.
    """
    data = line.encode("utf-8")
    chunks: list[str] = []
    while len(data) > limit:
        cut = max(data.rfind(bytes([c]), 0, limit) for c in _WHITESPACE) + 1
        if cut <= 0:
            cut = limit
            while data[cut] & 0xC0 == 0x80:  # never inside a UTF-8 character
                cut -= 1
        chunks.append(data[:cut].decode("utf-8"))
        data = data[cut:]
    if data:
        chunks.append(data.decode("utf-8"))
    return chunks


def trainer_sentences(documents: Iterable[str], max_bytes: int = TOKENIZER_SAMPLE_BYTES):
    """Documents -> non-empty lines short enough for the trainer; stops after max_bytes."""
    total = 0
    for doc in documents:
        for line in doc.split("\n"):
            for chunk in chunk_line(line):
                if chunk.strip():
                    yield chunk
        total += len(doc.encode("utf-8"))
        if total >= max_bytes:
            return


def train_tokenizer(
    documents: Iterable[str],
    out_model: Path,
    vocab_size: int = 1024,
    max_bytes: int = TOKENIZER_SAMPLE_BYTES,
) -> Path:
    """Train parameter-golf's SentencePiece BPE in memory; deterministic for given documents."""
    if not 4 < vocab_size <= 65536:
        raise LmkitError(f"--vocab-size must be between 5 and 65536, got {vocab_size}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=trainer_sentences(documents, max_bytes),
            model_writer=model,
            vocab_size=vocab_size,
            max_sentence_length=MAX_SENTENCE_BYTES,
            minloglevel=2,
            **TOKENIZER_SETTINGS,
        )
    except RuntimeError as e:
        raise LmkitError(f"tokenizer training failed ({e}); is the corpus big enough?") from None
    out_model = Path(out_model)
    atomic.write_bytes(out_model, model.getvalue())
    return out_model
