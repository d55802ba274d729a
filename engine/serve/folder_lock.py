"""One service per output folder: an exclusive lock on OUT/serve.lock, held while the service runs.

Two services on one folder would share history.sqlite3: the second would mark the
first one's running job interrupted, and both would write the same job records. The
lock is an OS file lock (flock on POSIX, msvcrt on Windows), so it goes away with its
process, even a killed one; the file only says who holds it, for the refusal message.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO

from threedis.engine.errors import UserError

LOCK_NAME = "serve.lock"


class FolderBusy(UserError):
    """Another process holds the output folder."""


def _try_lock(handle: IO[str]) -> bool:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
        return f"pid {int(info['pid'])}, {info.get('url') or 'no URL'}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that did not say which"


class FolderLock:
    """Held from acquire() to release(); `who` (pid, URL) is written into the lock file for the next comer."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._handle: IO[str] | None = None

    def acquire(self, url: str | None = None) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115  (held open while locked)
        if not _try_lock(handle):
            handle.close()
            raise FolderBusy(f"the output folder {self.path.parent} is in use by another threedis serve "
                             f"({_holder(self.path)}); stop it, or pass another --out")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "url": url, "since": time.time()}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()  # closing drops the lock; the file stays (removing it could race a new holder)

    @property
    def held(self) -> bool:
        return self._handle is not None
