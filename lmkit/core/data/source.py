"""A resolved data directory: its shards, manifest and the tokenizer that encoded them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmkit.core import jsonfile
from lmkit.core.data.shards import find_shards, load_stream, read_shard_header
from lmkit.core.tokenizer import Tokenizer
from lmkit.errors import LmkitError

MANIFEST_FORMAT = "lmkit-shards/1"
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.model"


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
        manifest = jsonfile.read_json(path)
    except LmkitError as e:
        raise LmkitError(f"{e}; delete it or re-run prepare") from None
    for key in ("tokenizer", "corpus"):
        if not isinstance(manifest.get(key, {}), dict):
            raise LmkitError(f"{path}: {key!r} must be an object; delete it or re-run prepare")
    tok = manifest.get("tokenizer") or {}
    for key in ("file", "sha256"):
        if tok.get(key) is not None and not isinstance(tok[key], str):
            raise LmkitError(f"{path}: tokenizer.{key} must be a string; delete it or re-run "
                             "prepare")
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
    if data_dir.exists() and not data_dir.is_dir():
        raise LmkitError(f"--data {data_dir} is a file; pass the directory that holds the token "
                         "shards (*_train_*.bin, *_val_*.bin)")
    if not data_dir.is_dir():
        raise LmkitError(
            f"data directory {data_dir} does not exist; run `lmkit data prepare` or pass --data DIR"
        )
    train, val = find_shards(data_dir, "train"), find_shards(data_dir, "val")  # shards first
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
    for shard in train + val:
        read_shard_header(shard)
    return DataSource(dir=data_dir, tokenizer=tokenizer, train_shards=train, val_shards=val,
                      manifest=manifest)


def load_val_tokens(src: DataSource, max_tokens: int | None = None) -> torch.Tensor:
    """All validation tokens in shard order (or a deterministic prefix of max_tokens targets)."""
    return load_stream(src.val_shards, src.vocab_size, max_tokens)
