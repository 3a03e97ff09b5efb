"""The one atomic writer: a uniquely named hidden temp file beside the target, then a rename.

Readers never see half a file, a crash leaves the previous version in place, and the temp file
is removed whatever goes wrong. Its hidden name never matches lmkit's ``*_train_*.bin`` globs.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def temp_name(name: str) -> str:
    """A hidden sibling name unique to this process and call."""
    return f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def write_bytes(path: str | Path, data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` (bytes or chunks of bytes) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with open(tmp, "xb") as f:  # plain open: the file gets the usual umask permissions
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any, indent: int = 1) -> None:
    """JSON (non-JSON values as strings) written atomically, with a final newline."""
    write_text(path, json.dumps(data, indent=indent, default=str) + "\n")
