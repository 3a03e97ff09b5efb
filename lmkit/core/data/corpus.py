"""Corpora: named text collections, from a registered name, a text/jsonl file or a directory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from lmkit.core.registry import get_corpus, get_registry
from lmkit.errors import LmkitError


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
    """The ``text`` of each line; bad UTF-8, lone surrogates, deep nesting or a line that is no
    object is one LmkitError naming the file and line."""
    from lmkit.core import jsonfile

    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = jsonfile.loads(line, f"{path}:{lineno}")
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


def resolve_corpus(spec: str) -> Corpus:
    """A registered corpus name, else a path to text/jsonl data."""
    if spec in get_registry().entries["corpus"]:
        return get_corpus(spec).obj
    path = Path(spec).expanduser()
    if path.exists():
        return corpus_from_path(path)
    known = ", ".join(sorted(get_registry().entries["corpus"])) or "none"
    raise LmkitError(f"--corpus {spec!r} is neither a registered corpus ({known}) nor a path")
