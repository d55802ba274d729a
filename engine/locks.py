"""One writer per folder: an exclusive lock that says who holds it.

Why: two `threedis batch` commands on one output folder would both render every
item and append to one manifest; two `threedis serve` on one folder would share its
history (the second would mark the first one's running job interrupted). The lock is an flock on a small file in the
folder, so the operating system releases it when its holder exits or is killed
(no stale locks to clean up); the file names its holder for the message the
second command prints. POSIX only: elsewhere (no fcntl) folders are not locked.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from threedis.engine.errors import UserError

LOCK_NAME = "threedis.lock"


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text[:200] or "another process"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str, hint: str = "") -> Iterator[Path]:
    """Hold `folder`'s lock for the block; a UserError naming the holder if another process has it.

    what: this process, for the next one's message ("threedis batch"). hint: what to do instead.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield Path(folder) / LOCK_NAME
        return
    folder = Path(folder)
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise UserError(f"cannot lock {folder}: {exc.strerror or exc}; check the folder's permissions or choose "
                            f"another folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"{folder} is in use by {_holder(path)}; wait for it to finish"
                            + (f" or {hint}" if hint else "")) from None
        try:  # the holder before us may have removed the file after we opened it: lock the file that is there
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.write(fd, f"{what} (pid {os.getpid()} on {socket.gethostname()}, since {since})\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it: the next holder creates a fresh file
        os.close(fd)  # releases the lock
