"""Train/validation leak checks: content hashes of documents and their overlap across splits.

In parameter-golf, submissions were excluded because validation documents were also trained on.
``lmkit data prepare`` therefore hashes every document's text and refuses a split that puts the
same text on both sides; ``lmkit data check`` verifies a directory after the fact: from lmkit's
hash file, or (official FineWeb shards) by hashing the token sequence of every document, and
optionally the texts of ``docs_selected.jsonl``.

Hashes are BLAKE2b with a 16-byte digest: collisions are out of reach at any corpus size and
memory stays bounded (one dict of validation digests; training is streamed past it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmkit.core.data.shards import HEADER_BYTES, find_shards, read_shard_header
from lmkit.errors import LmkitError

DOC_HASHES_NAME = "doc_hashes.bin"
HASH_NAME = "blake2b-128"
DIGEST_BYTES = 16
NORMALIZATION = "NFKC; every whitespace run -> one space; leading/trailing whitespace removed"
SHORT_NORMALIZATION = "NFKC and whitespace collapsing"
# The hash file: this magic, then one 17-byte record per non-empty corpus document in corpus
# order: a split byte (0 = train, 1 = val) and the 16-byte digest of its normalised text.
HASHES_MAGIC = b"lmkit-dochash/1\n"
RECORD_BYTES = 1 + DIGEST_BYTES
CHUNK_TOKENS = 1 << 22  # tokens read at once while streaming shards (8 MiB)

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC (the tokenizer's own normalisation, so texts it cannot tell apart hash alike) with
    whitespace collapsed, so copies differing only in line wrapping or trailing spaces match."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def text_digest(text: str) -> bytes:
    """The 16-byte content hash of a document's normalised UTF-8 text."""
    data = normalize_text(text).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


@dataclass
class Overlap:
    """Validation documents whose hash also occurs in training (indices are 0-based)."""

    train_docs: int = 0
    val_docs: int = 0
    overlap_docs: int = 0  # val documents with a training twin (each copy counted)
    overlap_tokens: int = 0  # their tokens, BOS included (token checks only)
    val_tokens: int = 0
    val_duplicates: int = 0  # val documents repeating an earlier val document (not a leak)
    empty_docs: int = 0  # documents with no tokens after BOS: never counted as overlap
    first_val: int | None = None  # the lowest overlapping val index ...
    first_train: int | None = None  # ... and the first training document equal to it

    def as_dict(self) -> dict[str, Any]:
        share = self.overlap_docs / self.val_docs if self.val_docs else 0.0
        out: dict[str, Any] = {
            "train_documents": self.train_docs, "val_documents": self.val_docs,
            "overlap_documents": self.overlap_docs, "overlap_share": share,
            "val_duplicates": self.val_duplicates,
            "first": None if self.first_val is None
            else {"val_document": self.first_val, "train_document": self.first_train},
        }
        if self.val_tokens:
            out.update(val_tokens=self.val_tokens, overlap_tokens=self.overlap_tokens,
                       overlap_token_share=self.overlap_tokens / self.val_tokens)
        if self.empty_docs:
            out["empty_documents"] = self.empty_docs
        return out


def overlap_of(val: Iterable[tuple[int, bytes, int]],
               train: Iterable[tuple[int, bytes]]) -> Overlap:
    """Compare (index, digest, tokens) of validation documents with (index, digest) of training.

    Validation digests are held in one dict; training is only streamed past it.
    """
    seen: dict[bytes, list[int]] = {}  # digest -> [first val index, copies, tokens per copy]
    res = Overlap()
    for i, digest, n in val:
        res.val_docs += 1
        entry = seen.get(digest)
        if entry is None:
            seen[digest] = [i, 1, n]
        else:
            entry[1] += 1
            res.val_duplicates += 1
    hit: dict[bytes, int] = {}  # digest -> first training index
    for j, digest in train:
        res.train_docs += 1
        if digest in seen and digest not in hit:
            hit[digest] = j
    for digest, j in hit.items():
        first, copies, n = seen[digest]
        res.overlap_docs += copies
        res.overlap_tokens += copies * n
        if res.first_val is None or first < res.first_val:
            res.first_val, res.first_train = first, j
    return res


# -- lmkit's hash file ---------------------------------------------------------------------------
def write_doc_hashes(path: Path, digests: bytes | bytearray, is_val: np.ndarray) -> None:
    """Write the hash file: the magic, then (split byte, digest) per document."""
    from lmkit.core import atomic

    n = len(is_val)
    if len(digests) != n * DIGEST_BYTES:
        raise ValueError(f"{len(digests)} digest bytes for {n} documents")
    records = np.empty((n, RECORD_BYTES), dtype=np.uint8)
    records[:, 0] = is_val
    records[:, 1:] = np.frombuffer(bytes(digests), dtype=np.uint8).reshape(n, DIGEST_BYTES)
    atomic.write_bytes(path, [HASHES_MAGIC, records.tobytes()])


def read_doc_hashes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(digests [N, 16] uint8, is_val [N] bool) from a hash file, validated."""
    raw = np.fromfile(path, dtype=np.uint8)
    body = raw[len(HASHES_MAGIC):]
    if raw[: len(HASHES_MAGIC)].tobytes() != HASHES_MAGIC or len(body) % RECORD_BYTES:
        raise LmkitError(f"{path} is not an lmkit document-hash file (bad header or truncated); "
                         "re-run `lmkit data prepare`")
    records = body.reshape(-1, RECORD_BYTES)
    if records.size and int(records[:, 0].max()) > 1:
        raise LmkitError(f"{path} has a split byte other than 0/1: damaged; re-run prepare")
    return records[:, 1:], records[:, 0].astype(bool)


def hashes_overlap(digests: np.ndarray, is_val: np.ndarray) -> Overlap:
    """Overlap of the validation and training documents of a hash file."""
    # lazily: only the validation digests end up in a dict; indices are corpus indices
    return overlap_of(((int(i), digests[i].tobytes(), 0) for i in np.flatnonzero(is_val)),
                      ((int(j), digests[j].tobytes()) for j in np.flatnonzero(~is_val)))


# -- token shards ---------------------------------------------------------------------------------
def shard_documents(shards: list[Path], bos: int,
                    chunk: int = CHUNK_TOKENS) -> Iterator[tuple[bytes, int]]:
    """(digest, tokens incl. BOS) of each BOS-started document of a shard stream, in order.

    Hashes the little-endian uint16 ids after the BOS. Reads ``chunk`` tokens at a time and
    carries a document across chunk and shard boundaries (writers split documents across shards);
    tokens before the first BOS count as one document.
    """
    h, n, open_doc = hashlib.blake2b(digest_size=DIGEST_BYTES), 0, False
    for shard in shards:
        total = read_shard_header(shard)
        for start in range(0, total, chunk):
            part = np.fromfile(shard, dtype="<u2", count=min(chunk, total - start),
                               offset=HEADER_BYTES + 2 * start)
            prev = 0
            for cut in np.flatnonzero(part == bos).tolist():
                h.update(part[prev:cut])
                n += cut - prev
                if open_doc or n:
                    yield h.digest(), n + open_doc
                h, n, open_doc, prev = hashlib.blake2b(digest_size=DIGEST_BYTES), 0, True, cut + 1
            h.update(part[prev:])
            n += len(part) - prev
    if open_doc or n:
        yield h.digest(), n + open_doc


def count_token(shards: list[Path], token: int, chunk: int = CHUNK_TOKENS) -> int:
    """How often ``token`` occurs in the shards (BOS: their number of documents), streamed."""
    count = 0
    for shard in shards:
        total = read_shard_header(shard)
        for start in range(0, total, chunk):
            part = np.fromfile(shard, dtype="<u2", count=min(chunk, total - start),
                               offset=HEADER_BYTES + 2 * start)
            count += int(np.count_nonzero(part == token))
    return count


EMPTY_DIGEST = hashlib.blake2b(b"", digest_size=DIGEST_BYTES).digest()


def _non_empty(docs: Iterable[tuple[bytes, int]], res: Overlap) -> Iterator[tuple[int, bytes, int]]:
    """(index, digest, tokens) of the documents with ids after BOS; a bare BOS would match every
    other bare BOS, so those are only counted."""
    for i, (digest, n) in enumerate(docs):
        if digest == EMPTY_DIGEST:
            res.empty_docs += 1
            continue
        yield i, digest, n


def token_overlap(train_shards: list[Path], val_shards: list[Path], bos: int) -> Overlap:
    """Overlap of the documents of two shard streams, by the hash of their token ids (indices
    are document ordinals within each split's stream)."""
    empties = Overlap()
    val = _non_empty(shard_documents(val_shards, bos), empties)
    train = ((j, d) for j, d, _ in _non_empty(shard_documents(train_shards, bos), empties))
    res = overlap_of(val, train)
    res.val_tokens = sum(read_shard_header(p) for p in val_shards)
    res.empty_docs = empties.empty_docs
    return res


# -- docs_selected.jsonl ------------------------------------------------------------------------
@dataclass
class _JsonlStats:
    docs: int = 0
    unreadable: int = 0
    first_bad_line: int | None = None


def jsonl_digests(path: Path, field: str, stats: _JsonlStats) -> Iterator[tuple[int, bytes]]:
    """(document index, text digest) of each readable non-blank line of a JSON-lines file.

    Streams the file. A line may be an object with ``field`` or a bare JSON string; anything else
    (bad JSON or UTF-8, missing field) is counted and skipped but keeps its index, so indices
    stay those of the file's documents.
    """
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            index = stats.docs
            stats.docs += 1
            text = None
            try:
                obj = json.loads(line)
                text = obj.get(field) if isinstance(obj, dict) else obj
            except (ValueError, RecursionError):  # bad JSON or UTF-8, absurd nesting
                pass
            if not isinstance(text, str):
                stats.unreadable += 1
                stats.first_bad_line = stats.first_bad_line or lineno
                continue
            yield index, text_digest(text)


def jsonl_overlap(path: Path, n_val: int, field: str = "text") -> dict[str, Any]:
    """Text-level overlap in parameter-golf's ``docs_selected.jsonl``: the first ``n_val``
    documents are validation, the rest the pool training was drawn from."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmkitError(f"--docs {path} does not exist")
    stats = _JsonlStats()
    docs = jsonl_digests(path, field, stats)
    val = []  # held anyway by overlap_of's dict; n_val is the small side
    rest: list[tuple[int, bytes]] = []
    for index, digest in docs:
        if index >= n_val:
            rest.append((index, digest))  # the first training document, read one too far
            break
        val.append((index, digest, 0))
    val_unreadable = stats.unreadable
    res = overlap_of(val, itertools.chain(rest, docs))
    if stats.docs and stats.unreadable == stats.docs:
        raise LmkitError(f"--docs {path}: no line holds a JSON object with a {field!r} string "
                         "(pass --text-field NAME)")
    return {"name": "text", "source": str(path), "hash": HASH_NAME,
            "normalization": NORMALIZATION, "rule": f"the first {n_val} documents are validation",
            "indices": "non-blank lines of the file, from 0",
            **res.as_dict(), "lines": stats.docs, "unreadable_lines": stats.unreadable,
            "unreadable_val_lines": val_unreadable, "first_unreadable_line": stats.first_bad_line}


# -- lmkit data check ---------------------------------------------------------------------------
def _hash_file_check(data_dir: Path, manifest: dict) -> tuple[dict[str, Any], list[str]]:
    rec = manifest["doc_hashes"]
    path = data_dir / rec.get("file", DOC_HASHES_NAME)
    if not path.is_file():
        raise LmkitError(f"{data_dir / 'manifest.json'} names {path.name}, but it is missing; "
                         "restore it or re-run `lmkit data prepare`")
    digests, is_val = read_doc_hashes(path)
    res = hashes_overlap(digests, is_val)
    problems = []
    for key, got in (("train_documents", res.train_docs), ("val_documents", res.val_docs),
                     ("overlap_documents", res.overlap_docs)):
        if rec.get(key) != got:
            problems.append(f"manifest.json doc_hashes.{key} is {rec.get(key)} but {path.name} "
                            f"gives {got}")
    out = {"name": "text", "source": str(path), "hash": rec.get("hash", HASH_NAME),
           "normalization": rec.get("normalization", NORMALIZATION),
           "indices": "non-empty corpus documents in corpus order, from 0",
           "allowed_at_prepare": bool(rec.get("allow_overlap")), **res.as_dict()}
    return out, problems


def check_data(data_dir: Path, *, tokens: bool = False, docs: Path | None = None,
               text_field: str = "text", val_docs: int | None = None,
               bos: int | None = None) -> dict[str, Any]:
    """``lmkit data check``: the train/val overlap report of a data directory.

    An lmkit directory is checked from its hash file (nothing is re-tokenised); other
    directories, or ``tokens=True``, hash each document's token ids; ``docs`` adds the texts of a
    ``docs_selected.jsonl``. ``report["ok"]`` is False when any check finds overlap or the
    manifest disagrees with the hashes.
    """
    from lmkit.core import jsonfile
    from lmkit.core.data.source import MANIFEST_NAME

    data_dir = Path(data_dir).expanduser()
    train, val = find_shards(data_dir, "train"), find_shards(data_dir, "val")
    manifest = None
    if (data_dir / MANIFEST_NAME).is_file():
        manifest = jsonfile.read_json(data_dir / MANIFEST_NAME)
    has_hashes = isinstance(manifest, dict) and isinstance(manifest.get("doc_hashes"), dict)
    if bos is None:
        tok = (manifest or {}).get("tokenizer") if isinstance(manifest, dict) else None
        bos = tok.get("bos_id", 1) if isinstance(tok, dict) else 1
    if not isinstance(bos, int) or not 0 <= bos <= 0xFFFF:
        raise LmkitError(f"--bos must be a token id in 0..65535, got {bos!r}")
    checks: list[dict[str, Any]] = []
    problems: list[str] = []
    if docs is not None and has_hashes:
        raise LmkitError(f"--docs is for parameter-golf directories; {data_dir} has lmkit's "
                         f"{DOC_HASHES_NAME}, which already checks the texts")
    if has_hashes:
        check, problems = _hash_file_check(data_dir, manifest)
        checks.append(check)
    if tokens or not has_hashes:
        res = token_overlap(train, val, bos)
        checks.append({"name": "tokens", "source": f"{len(train)} train / {len(val)} val shards",
                       "hash": HASH_NAME, "bos": bos,
                       "indices": "documents of each split's shard stream, from 0",
                       **res.as_dict()})
    if docs is not None:
        if val_docs is None:
            val_docs = count_token(val, bos)
        if val_docs < 1:
            raise LmkitError(f"--val-docs must be at least 1, got {val_docs}")
        checks.append(jsonl_overlap(docs, val_docs, text_field))
    leak = any(c["overlap_documents"] for c in checks)
    return {"dir": str(data_dir), "layout": "lmkit" if has_hashes else "shards",
            "ok": not leak and not problems, "leak": leak, "problems": problems,
            "checks": checks}


def format_report(report: dict[str, Any]) -> str:
    """The few lines ``lmkit data check`` prints."""
    lines = [f"{report['dir']} ({report['layout']} layout)"]
    for c in report["checks"]:
        what = "document texts" if c["name"] == "text" else "document token ids"
        lines.append(f"  {what} [{c['hash']}] from {c['source']}:")
        if c.get("rule"):
            lines.append(f"    ({c['rule']})")
        lines.append(f"    {c['train_documents']:,} train / {c['val_documents']:,} val documents; "
                     f"{c['overlap_documents']:,} val documents also in train "
                     f"({c['overlap_share']:.2%} of val docs"
                     + (f", {c['overlap_token_share']:.2%} of val tokens)"
                        if "overlap_token_share" in c else ")"))
        if c["first"]:
            lines.append(f"    first: val document {c['first']['val_document']} = train document "
                         f"{c['first']['train_document']} (indices: {c['indices']})")
        if c.get("val_duplicates"):
            lines.append(f"    {c['val_duplicates']:,} val documents repeat an earlier val "
                         "document (not a leak)")
        if c.get("unreadable_lines"):
            lines.append(f"    {c['unreadable_lines']:,} unreadable lines (first: line "
                         f"{c['first_unreadable_line']}); they are not compared")
        if c.get("allowed_at_prepare"):
            lines.append("    (overlap was allowed at prepare time with --allow-overlap)")
    lines += [f"  problem: {p}" for p in report["problems"]]
    lines.append("LEAK: validation documents also occur in training" if report["leak"] else
                 "inconsistent: see the problems above" if report["problems"] else
                 "ok: no validation document occurs in training")
    return "\n".join(lines)
