"""Token shard files: the on-disk format, writing, validating and reading shards.

The shard format is parameter-golf's, so an official FineWeb directory works unchanged:
a header of 256 little-endian int32 ([0]=magic, [1]=version, [2]=num_tokens) followed by
num_tokens little-endian uint16 ids. Every document is stored as [BOS] + ids (no EOS).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from lmkit.core import atomic
from lmkit.errors import LmkitError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SPLITS = ("train", "val")


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
