"""Token shards, the rotating training loader, and the corpus -> tokenizer -> shards pipeline.

The shard format is parameter-golf's, so an official FineWeb directory works unchanged:
a header of 256 little-endian int32 ([0]=magic, [1]=version, [2]=num_tokens) followed by
num_tokens little-endian uint16 ids. Every document is stored as [BOS] + ids (no EOS).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm
import torch

from lmkit.core import atomic
from lmkit.core.tokenizer import Tokenizer, load_processor
from lmkit.errors import LmkitError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MANIFEST_FORMAT = "lmkit-shards/1"
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.model"
SPLITS = ("train", "val")

# ---------------------------------------------------------------------------------------------
# Shard files
# ---------------------------------------------------------------------------------------------


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write `tokens` as one shard file (atomically); ids must fit in uint16."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"write_shard expects a 1-D token array, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > 0xFFFF):
        bad = int(tokens.max()) if int(tokens.max()) > 0xFFFF else int(tokens.min())
        raise LmkitError(
            f"cannot write {path}: token id {bad} does not fit the uint16 shard format "
            "(vocabularies above 65536 ids are not supported)"
        )
    if tokens.size >= 2**31:
        raise LmkitError(f"cannot write {path}: {tokens.size} tokens overflow the int32 count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    body = tokens.astype("<u2", copy=False)
    atomic.write_bytes(path, [header.tobytes(), body.tobytes()])


def read_shard_header(path: Path) -> int:
    """Validate a shard's header and exact size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise LmkitError(f"shard {path} does not exist") from None
    if size < HEADER_BYTES:
        raise LmkitError(
            f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header "
            "(truncated or not a token shard); re-create it with `lmkit data prepare`"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, num_tokens = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise LmkitError(
            f"shard {path} has magic {magic}, expected {SHARD_MAGIC}: not a parameter-golf/lmkit "
            "token shard; remove it from the data directory"
        )
    if version != SHARD_VERSION:
        raise LmkitError(
            f"shard {path} has format version {version}; lmkit reads version {SHARD_VERSION} only"
        )
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise LmkitError(
            f"shard {path} is {what}: header says {num_tokens} tokens ({expected} bytes) but the "
            f"file has {size} bytes; re-download it or re-run `lmkit data prepare`"
        )
    return num_tokens


def load_shard(path: Path, out: np.ndarray | None = None) -> np.ndarray:
    """Read a shard's tokens as uint16; with `out`, read straight into out[:n] (no extra copy)."""
    path = Path(path)
    n = read_shard_header(path)
    if out is None:
        return np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES).astype(
            np.uint16, copy=False
        )
    if out.dtype != np.uint16 or out.ndim != 1 or len(out) < n:
        raise ValueError(f"out must be a 1-D uint16 array of at least {n} elements")
    dst = out[:n]
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        got = f.readinto(memoryview(dst).cast("B"))
    if got != 2 * n:
        raise LmkitError(f"shard {path} changed while it was being read; try again")
    if sys.byteorder == "big":
        dst.byteswap(inplace=True)
    return dst


def find_shards(data_dir: Path, split: str) -> list[Path]:
    """The `*_{split}_*.bin` shards of a directory, sorted by name (train or val)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LmkitError(
            f"data directory {data_dir} does not exist; run `lmkit data prepare` or pass --data DIR"
        )
    shards = sorted(p for p in data_dir.glob(f"*_{split}_*.bin") if p.is_file())
    if not shards:
        raise LmkitError(
            f"no {split} shards (*_{split}_*.bin) in {data_dir}; run `lmkit data prepare --out "
            f"{data_dir}` or point --data at a directory of token shards"
        )
    return shards


# ---------------------------------------------------------------------------------------------
# A resolved data directory
# ---------------------------------------------------------------------------------------------


@dataclass
class DataSource:
    """A validated data directory: shards plus the tokenizer they were encoded with."""

    dir: Path
    tokenizer: Tokenizer
    train_shards: list[Path]
    val_shards: list[Path]
    manifest: dict | None = None

    @property
    def tokenizer_path(self) -> Path:
        return self.tokenizer.path

    @property
    def tokenizer_sha256(self) -> str:
        return self.tokenizer.sha256

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_id

    def describe(self) -> dict:
        """JSON-able summary for run metadata (headers are re-read: cheap, 1 KB each)."""
        tokens = {
            "train": sum(read_shard_header(p) for p in self.train_shards),
            "val": sum(read_shard_header(p) for p in self.val_shards),
        }
        corpus = (self.manifest or {}).get("corpus", {}).get("name")
        return {
            "dir": str(self.dir.resolve()),
            "corpus": corpus,
            "tokenizer": self.tokenizer.describe(),
            "shards": {"train": len(self.train_shards), "val": len(self.val_shards)},
            "tokens": tokens,
        }


def _read_manifest(data_dir: Path) -> dict | None:
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmkitError(f"{path} is not valid JSON ({e}); delete it or re-run prepare") from None
    if not isinstance(manifest, dict):
        raise LmkitError(f"{path} must hold a JSON object; delete it or re-run prepare")
    return manifest


def _resolve_tokenizer(data_dir: Path, tokenizer: Path | None, manifest: dict | None) -> Path:
    """Explicit --tokenizer, else the manifest's, else the one *.model in the directory."""
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        if not path.is_file():
            raise LmkitError(f"--tokenizer {path} does not exist")
        return path
    recorded = ((manifest or {}).get("tokenizer") or {}).get("file")
    if recorded:
        path = data_dir / recorded
        if not path.is_file():
            raise LmkitError(
                f"{data_dir / MANIFEST_NAME} names tokenizer {recorded}, but {path} is missing; "
                "restore it or pass --tokenizer MODEL"
            )
        return path
    models = sorted(data_dir.glob("*.model"))
    if len(models) == 1:
        return models[0]
    found = f" (found {', '.join(m.name for m in models)})" if models else ""
    raise LmkitError(
        f"cannot tell which tokenizer encoded the shards in {data_dir}{found}; "
        "pass --tokenizer MODEL"
    )


def open_data(data_dir: Path, tokenizer: Path | Tokenizer | None = None) -> DataSource:
    """Resolve and validate a data directory without reading its tokens.

    ``tokenizer`` is a path (``--tokenizer``) or an already loaded :class:`Tokenizer` (a run's
    own copy), else the one the directory names; it must be the one the shards were made with.
    """
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise LmkitError(
            f"data directory {data_dir} does not exist; run `lmkit data prepare` or pass --data DIR"
        )
    manifest = _read_manifest(data_dir)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.load(_resolve_tokenizer(data_dir, tokenizer, manifest))
    recorded_sha = ((manifest or {}).get("tokenizer") or {}).get("sha256")
    if recorded_sha and recorded_sha != tokenizer.sha256:
        recorded_file = (manifest.get("tokenizer") or {}).get("file", "?")
        raise LmkitError(
            f"shards in {data_dir} were encoded with a different tokenizer: "
            f"{data_dir / MANIFEST_NAME} records {recorded_file} with sha256 "
            f"{recorded_sha[:12]}..., but {tokenizer.path} has sha256 {tokenizer.sha256[:12]}...; "
            "pass the tokenizer the shards were made with or re-run `lmkit data prepare`"
        )
    train, val = find_shards(data_dir, "train"), find_shards(data_dir, "val")
    for shard in train + val:
        read_shard_header(shard)
    return DataSource(dir=data_dir, tokenizer=tokenizer, train_shards=train, val_shards=val,
                      manifest=manifest)


def _check_ids(tokens: np.ndarray, vocab_size: int | None, shard: Path) -> None:
    if vocab_size is None or tokens.size == 0:
        return
    top = int(tokens.max())
    if top >= vocab_size:
        raise LmkitError(
            f"shard {shard} holds token id {top} but the tokenizer has only {vocab_size} ids: "
            "shards and tokenizer do not belong together; pass the matching --tokenizer"
        )


def load_stream(shards: list[Path], vocab_size: int | None = None,
                max_tokens: int | None = None) -> torch.Tensor:
    """The tokens of ``shards`` in order (or a deterministic prefix of ``max_tokens`` targets:
    ``max_tokens + 1`` tokens), int64, with every id checked against the vocabulary."""
    if max_tokens is not None and max_tokens < 1:
        raise LmkitError(f"--max-tokens must be at least 1, got {max_tokens}")
    need = None if max_tokens is None else max_tokens + 1
    parts: list[np.ndarray] = []
    got = 0
    for shard in shards:
        n = read_shard_header(shard)
        take = n if need is None else min(n, need - got)
        if take <= 0:
            break
        part = np.fromfile(shard, dtype="<u2", count=take, offset=HEADER_BYTES)
        _check_ids(part, vocab_size, shard)
        parts.append(part)
        got += take
    if got < 2:
        where = Path(shards[0]).parent if shards else "the data"
        raise LmkitError(f"validation shards in {where} hold {got} token(s); need at least 2")
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def load_val_tokens(src: DataSource, max_tokens: int | None = None) -> torch.Tensor:
    """All validation tokens in shard order (or a deterministic prefix of max_tokens targets)."""
    return load_stream(src.val_shards, src.vocab_size, max_tokens)


# ---------------------------------------------------------------------------------------------
# The rotating training loader
# ---------------------------------------------------------------------------------------------


class RotatingLoader:
    """Batches from shard groups held one at a time in a single preallocated buffer.

    Each epoch permutes the shards (seeded by (seed, epoch)) and cuts the permutation into
    groups of `group_size`; that is how a corpus larger than RAM is still visited in full.
    A step takes one contiguous global span of world_size*batch_size*seq_len + 1 tokens;
    rank r reads its own batch_size*seq_len + 1 slice, so ranks see disjoint targets.
    """

    def __init__(
        self,
        shards: list[Path],
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        group_size: int = 0,
        vocab_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not shards:
            raise LmkitError("no training shards given to the loader; check --data")
        if batch_size < 1 or seq_len < 1:
            raise LmkitError(f"batch_size and seq_len must be >= 1 (got {batch_size}, {seq_len})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if group_size < 0:
            raise LmkitError(f"group_size must be >= 0 (0 = all shards), got {group_size}")
        self.shards = [Path(p) for p in shards]
        self.sizes = [read_shard_header(p) for p in self.shards]
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.vocab_size = rank, world_size, vocab_size
        n = len(self.shards)
        self.group_size = n if group_size == 0 or group_size >= n else group_size
        self.single_group = self.group_size == n
        self.tokens_per_step = batch_size * seq_len * world_size
        self.span = self.tokens_per_step + 1
        self._check_fits()
        # The one buffer: big enough for the largest group any epoch can draw.
        largest = sum(sorted(self.sizes, reverse=True)[: self.group_size])
        self.buffer = np.empty(largest, dtype=np.uint16)
        self.epoch, self.group, self.offset = 0, 0, 0
        self._loaded: tuple[int, int] | None = None  # (epoch, group) now in the buffer
        self._group_len = 0
        self._validated: set[Path] = set()

    def _check_fits(self) -> None:
        """Fail now, not mid-run, if some group an epoch can draw is shorter than one span."""
        n, g = len(self.shards), self.group_size
        smallest_group = n % g or g
        least = sum(sorted(self.sizes)[:smallest_group])
        if least < self.span:
            raise LmkitError(
                f"data too small: a group of {smallest_group} shard(s) can hold as few as {least} "
                f"tokens, less than one step's span of {self.span} "
                f"(world_size*batch_size*seq_len + 1); lower batch_size or seq_len"
                + ("" if self.single_group else ", or raise group_size (0 = all shards)")
            )

    def _group_order(self, epoch: int) -> list[list[int]]:
        if self.single_group:
            return [list(range(len(self.shards)))]
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        g = self.group_size
        return [perm[i : i + g].tolist() for i in range(0, len(perm), g)]

    def _ensure_loaded(self) -> None:
        key = (0, 0) if self.single_group else (self.epoch, self.group)
        if self._loaded == key:
            return
        pos = 0
        for i in self._group_order(self.epoch)[self.group]:
            part = load_shard(self.shards[i], out=self.buffer[pos:])
            if self.shards[i] not in self._validated:
                _check_ids(part, self.vocab_size, self.shards[i])
                self._validated.add(self.shards[i])
            pos += len(part)
        if pos < self.span:  # unreachable after _check_fits unless files changed underneath
            raise LmkitError(f"data too small for batch_size*seq_len: group holds {pos} tokens")
        self._loaded, self._group_len = key, pos

    def _advance_group(self) -> None:
        self.group, self.offset = self.group + 1, 0
        if self.group >= len(self._group_order(self.epoch)):
            self.epoch, self.group = self.epoch + 1, 0

    def next_batch(self) -> torch.Tensor:
        """int64 [batch_size, seq_len + 1]; rows overlap by one token (x=row[:-1], y=row[1:])."""
        while True:
            self._ensure_loaded()
            if self.offset + self.span <= self._group_len:
                break
            self._advance_group()
        local = self.batch_size * self.seq_len
        start = self.offset + self.rank * local
        sub = torch.from_numpy(self.buffer[start : start + local + 1].astype(np.int64))
        self.offset += self.tokens_per_step
        return sub.unfold(0, self.seq_len + 1, self.seq_len).contiguous()

    def state_dict(self) -> dict:
        """JSON-serialisable position; with the same shards and seed it resumes exactly."""
        return {
            "epoch": self.epoch,
            "group": self.group,
            "offset": self.offset,
            "seed": self.seed,
            "group_size": self.group_size,
            "shards": [p.name for p in self.shards],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuse a state recorded over other shards, seed or grouping."""
        names = [p.name for p in self.shards]
        for key, mine in (("shards", names), ("seed", self.seed), ("group_size", self.group_size)):
            if state.get(key) != mine:
                raise LmkitError(
                    f"cannot resume the data loader: its saved {key} ({state.get(key)!r}) differs "
                    f"from this run's ({mine!r}); resume with the same --data and seed"
                )
        self.epoch, self.group, self.offset = (int(state[k]) for k in ("epoch", "group", "offset"))


# ---------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class Corpus(Protocol):
    """A named text collection; documents() must yield the same strings in the same order."""

    name: str
    description: str

    def documents(self) -> Iterator[str]: ...


def read_text_file(path: Path) -> str:
    """A whole file as UTF-8 text, byte-exact (no newline translation)."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmkitError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8") from None


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmkitError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise LmkitError(
                    f"{path}:{lineno}: each line of a .jsonl corpus must be an object with a "
                    '"text" string field'
                )
            yield obj["text"]


@dataclass
class ListCorpus:
    """An in-memory corpus (tests, notebooks)."""

    name: str
    docs: list[str]
    description: str = "in-memory documents"

    def documents(self) -> Iterator[str]:
        yield from self.docs


@dataclass
class PathCorpus:
    """A .txt file (one document), a .jsonl file (one per line) or a directory of them."""

    path: Path
    name: str
    description: str
    files: list[Path] = field(default_factory=list)

    def documents(self) -> Iterator[str]:
        for f in self.files:
            docs = _jsonl_documents(f) if f.suffix == ".jsonl" else iter([read_text_file(f)])
            for doc in docs:
                if doc.strip():
                    yield doc


def corpus_from_path(path: Path) -> Corpus:
    """Turn --corpus PATH into a Corpus (files are listed now, read lazily)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise LmkitError(f"corpus directory {path} has no *.txt or *.jsonl files")
        desc = f"{len(files)} text files under {path}"
        return PathCorpus(path=path, name=path.resolve().name, description=desc, files=files)
    if path.is_file() and path.suffix in (".txt", ".jsonl"):
        desc = f"documents from {path}"
        return PathCorpus(path=path, name=path.stem, description=desc, files=[path])
    if path.exists():
        raise LmkitError(f"--corpus {path}: expected a .txt file, a .jsonl file or a directory")
    raise LmkitError(f"--corpus {path}: no such corpus name, file or directory")


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Corpus -> shards
# ---------------------------------------------------------------------------------------------


def _safe_name(name: str) -> str:
    """A corpus name usable in file names; '_' is replaced so *_train_* globs stay unambiguous."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-.") or "corpus"


def default_data_dir(corpus_name: str, vocab_size: int) -> Path:
    """Where a named corpus is prepared once and reused: $LMKIT_HOME/data/NAME-spVOCAB."""
    home = Path(os.environ.get("LMKIT_HOME") or "~/.cache/lmkit").expanduser()
    return home / "data" / f"{_safe_name(corpus_name)}-sp{vocab_size}"


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
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Corpus -> (trained or given) tokenizer -> train/val shards + manifest.json; returns it.

    Streams the corpus (one pass to count, one to sample for the tokenizer, one to encode), so
    memory stays bounded, and builds everything in a temp dir renamed at the end: a crash
    leaves no half-made data directory.
    """
    out_dir = Path(out_dir).expanduser()
    if not 0 < val_fraction < 1:
        raise LmkitError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if shard_tokens < 1:
        raise LmkitError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LmkitError(f"--out {out_dir} exists and is not empty; remove it or pick another")

    log(f"reading corpus {corpus.name}")
    doc_bytes = array("q", (len(doc.encode("utf-8")) for doc in _nonempty(corpus)))
    n_docs = len(doc_bytes)
    if n_docs < 2:
        raise LmkitError(f"corpus {corpus.name} has {n_docs} non-empty document(s); need >= 2")
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(split_seed).permutation(n_docs)[:n_val]] = True
    sizes = np.frombuffer(doc_bytes, dtype=np.int64)
    text_bytes = {"train": int(sizes[~is_val].sum()), "val": int(sizes[is_val].sum())}
    log(f"{n_docs} documents ({n_docs - n_val} train, {n_val} val), {sizes.sum():,} bytes")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / atomic.temp_name(out_dir.name)
    tmp.mkdir()
    try:
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
