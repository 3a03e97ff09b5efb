"""The tokenizer as one value: loaded and hashed once where data or a run is opened, then handed
down to everything that needs its ids, its text or its byte LUT (never re-read from disk)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmkit.errors import LmkitError

if TYPE_CHECKING:
    import sentencepiece as spm

    from lmkit.core.bpb import ByteLUT


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file: how lmkit checks that shards, runs and tokenizers belong together."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_processor(path: Path, what: str = "tokenizer") -> spm.SentencePieceProcessor:
    """The one SentencePiece loader: a missing or corrupt file is a clear user error."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise LmkitError(f"{what} {path} does not exist; pass the SentencePiece .model file "
                         "the data was tokenized with (--tokenizer MODEL)")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # noqa: BLE001 - sentencepiece raises several types for damage
        raise LmkitError(f"{what} {path} is not a loadable SentencePiece model ({e}); pass the "
                         ".model file (not the .vocab)") from None


@dataclass(eq=False)
class Tokenizer:
    """A SentencePiece model with its file, sha256 and (cached) byte LUTs."""

    path: Path
    sha256: str
    processor: Any  # sentencepiece.SentencePieceProcessor
    _luts: dict[int, ByteLUT] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path, what: str = "tokenizer") -> Tokenizer:
        path = Path(path).expanduser()
        processor = load_processor(path, what)
        return cls(path, sha256_file(path), processor)

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    @property
    def bos_id(self) -> int:
        return int(self.processor.bos_id())

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text, out_type=int))

    def decode(self, ids: list[int]) -> str:
        return str(self.processor.decode(ids))

    def lut(self, size: int | None = None) -> ByteLUT:
        """The exact byte LUT, padded to ``size`` ids (MASK/PAD rows count 0 bytes); built once
        per size, on the CPU (``.to(device)`` it where it is used)."""
        from lmkit.core.bpb import ByteLUT

        key = self.vocab_size if size is None else int(size)
        if key not in self._luts:
            self._luts[key] = ByteLUT.from_sentencepiece(self.processor, size=key)
        return self._luts[key]

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id}
