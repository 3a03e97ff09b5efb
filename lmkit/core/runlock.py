"""One writer per run directory: a lock file held by the training process.

``RUN/.lock`` records who trains the run (pid, host, process start time, command). It is
created with a hard link from a fully written temp file, so it exists only with its content
(``link`` fails when the name exists: the same guarantee as ``O_CREAT|O_EXCL``). A lock left by
a process that died (SIGKILL, power cut) is *stale*: on the same host its pid is gone, or the
pid now belongs to a later process; it is taken over with a warning. A live holder, or one on
another host, is refused with a message naming it. Without it, a second ``--resume`` of a
training run interleaves two writers into ``metrics.jsonl`` and the checkpoint.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sys
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from lmkit.core import atomic
from lmkit.errors import LmkitError

LOCK_FILE = ".lock"


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), which tells a reused pid from its first owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the command name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:  # a zombie (killed, not yet reaped: e.g. a torchrun rank whose launcher was killed)
        stat = Path(f"/proc/{pid}/stat").read_text()  # has exited and holds nothing
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            f" ({' '.join(holder.get('argv') or [])})")


class RunLock:
    """Context manager: hold ``run_dir``'s lock for the life of a training process."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.held = False
        self.me = {"pid": os.getpid(), "host": socket.gethostname(),
                   "proc_start": _proc_start(os.getpid()),
                   "started": dt.datetime.now().isoformat(timespec="seconds"),
                   "argv": sys.argv}

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record, or None (no lock, or an unreadable one)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:
            return True  # written by link from a complete file, so unreadable = damaged
        if holder.get("host") != self.me["host"]:
            return False  # cannot tell from here
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return True
        start = holder.get("proc_start")
        return start is not None and _proc_start(pid) not in (None, start)

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / atomic.temp_name(LOCK_FILE)
        atomic.write_json(tmp, self.me)
        try:
            for _ in range(3):
                try:
                    self._create(tmp)
                    self.held = True
                    return
                except FileExistsError:
                    holder = self.holder()
                    if holder is not None and holder.get("pid") == os.getpid() \
                            and holder.get("host") == self.me["host"]:
                        raise LmkitError(f"{self.run_dir} is already being trained by this "
                                         f"process") from None
                    if not self._stale(holder):
                        raise LmkitError(
                            f"{self.run_dir} is being trained by {describe(holder or {})}; wait "
                            f"for it to finish or stop it (if that process is gone, delete "
                            f"{self.path})") from None
                    self._break(holder)
            raise LmkitError(f"could not lock {self.run_dir}: {self.path} keeps reappearing")
        finally:
            tmp.unlink(missing_ok=True)

    def _create(self, tmp: Path) -> None:
        """Create the lock from the complete ``tmp``; FileExistsError if it exists."""
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: exclusive create, then write
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(tmp.read_bytes())

    def _break(self, holder: dict[str, Any] | None) -> None:
        """Remove a stale lock, unless another process replaced it since it was read."""
        aside = self.run_dir / atomic.temp_name(LOCK_FILE + ".stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved != holder:  # a fresh lock, taken in between: give it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            raise LmkitError(f"{self.run_dir} is being trained by {describe(moved or {})}")
        aside.unlink(missing_ok=True)
        warnings.warn(f"lmkit: {self.run_dir}: taking over the stale lock of "
                      f"{describe(holder or {})}, which is no longer running",
                      atomic.RecoveryWarning, stacklevel=3)

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder is not None and holder.get("pid") == self.me["pid"]:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
