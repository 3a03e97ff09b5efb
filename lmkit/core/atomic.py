"""The one atomic writer: a uniquely named hidden temp file beside the target, then a rename.

Readers never see half a file, a crash leaves the previous version in place, and the temp file
is removed whatever goes wrong. Its hidden name never matches lmkit's ``*_train_*.bin`` globs.
A folder of files (``lmkit export``) is filled in a hidden sibling directory
(:func:`staged_dir`) and renamed into place whole.
With ``durable=True`` the file and its directory are fsynced, so the rename survives a power
cut too (checkpoints use it: a file that claims to be complete must be complete). A full disk
is reported as one :class:`~lmkit.errors.LmkitError` naming the path and the space involved.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmkit.errors import LmkitError


class DiskFullError(LmkitError):
    """The device ran out of space (ENOSPC/EDQUOT) while lmkit wrote a file."""


class RecoveryWarning(UserWarning):
    """A run file was repaired after a crash (a torn log line dropped, a checkpoint promoted)."""


def temp_name(name: str) -> str:
    """A hidden sibling name unique to this process and call."""
    return f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def disk_full_error(path: str | Path, needed: int | None = None, note: str = "") -> DiskFullError:
    """The one message for ENOSPC: what was being written, how much it needs, what is free."""
    path = Path(path)
    where = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        free = f"{_mb(shutil.disk_usage(where).free)} free"
    except OSError:
        free = "free space unknown"
    need = f"about {_mb(needed)} needed, " if needed else ""
    return DiskFullError(f"no space left on the device writing {path} ({need}{free}){note}; "
                         f"free some space and run the command again")


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(path: str | Path) -> None:
    """Make renames inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes | Iterable[bytes], *, durable: bool = False) -> None:
    """Write ``data`` (bytes or chunks of bytes) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with open(tmp, "xb") as f:  # plain open: the file gets the usual umask permissions
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            needed = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else None
            raise disk_full_error(path, needed) from None
        raise


def write_text(path: str | Path, text: str, *, durable: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path: str | Path, data: Any, indent: int = 1, *, durable: bool = False) -> None:
    """Strict JSON (non-finite numbers become null with a reason; see
    :mod:`lmkit.core.jsonfile`) written atomically, with a final newline. The one JSON writer."""
    from lmkit.core.jsonfile import dumps

    write_text(path, dumps(data, indent=indent) + "\n", durable=durable)


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """A hidden temporary directory beside ``path`` to fill (with this module's writers); when
    the block succeeds it is renamed to ``path`` (a folder already there is first renamed aside,
    then removed), so ``path`` never holds half the files. On any error the temporary directory
    is removed and ``path`` is left as it was. Whether replacing ``path`` is allowed is the
    caller's decision, made before the work starts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    old = path.with_name(temp_name(path.name + ".old"))
    tmp.mkdir()
    renaming = False  # an OSError while renaming is about the folders, not the caller's work
    try:
        yield tmp
        renaming = True
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # the swap failed half-way: put the previous folder back
        if is_disk_full(exc):
            raise disk_full_error(path) from None
        if isinstance(exc, OSError) and renaming:
            raise LmkitError(f"cannot move the new {path.name} into place at {path} "
                             f"({exc.strerror or exc}); nothing there was changed") from None
        raise
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
