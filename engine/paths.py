"""What a path the user gave turns out to be, said in one line: files the engine reads, folders it writes.

Why a module of its own: `Path.is_file()` is False for a missing file, a folder, a
named pipe and a device alike, so "file not found" was said of all four; and a
folder made where a file already stands failed with a bare `[Errno 17] File exists`.
Every reader (layouts, masks, depth maps, photos, profiles, LoRAs, images to render
again) and every folder maker (outputs, caches, tiny checkpoints) asks here, so each
case gets its own words everywhere. Imports nothing heavy: `threedis validate` and
the profile reader stay free of torch.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from threedis.engine.errors import UserError

__all__ = ["cache_root", "check_folder_could_be_made", "file_problem", "folder_problem", "input_file", "make_folder",
           "unmakeable_folder"]

_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"),
          (stat.S_ISSOCK, "a socket"))


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """None when `path` is a regular file (links followed) that may be opened; else what it is instead.

    The words fit after the path: "not found", "is a folder, not a file", "is a named
    pipe (FIFO), not a file", "cannot be read: Permission denied". Never opens the
    path, so a pipe or a device cannot block or stream forever.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "not found"
    except NotADirectoryError:
        return "not found (a folder on its way is a file)"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISDIR(info.st_mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
        return f"is {kind}, not a file"
    if not os.access(path, os.R_OK):
        return "cannot be read: Permission denied"
    return None


def input_file(path: str | os.PathLike[str], what: str, hint: str = "") -> Path:
    """`path` as a Path if it is a readable regular file, else UserError("<what> <path>: <problem>[; hint]")."""
    problem = file_problem(path)
    if problem is not None:
        raise UserError(f"{what} {os.fspath(path)}: {problem}{'; ' + hint if hint else ''}")
    return Path(path)


def folder_problem(path: str | os.PathLike[str], exc: OSError) -> str:
    """Why making or writing the folder `path` failed with `exc`, in words that say what stands in the way."""
    path = Path(path)
    if isinstance(exc, FileExistsError) or (exc.errno == errno.EEXIST):
        return f"{path} is a file, not a folder"
    if isinstance(exc, NotADirectoryError) or exc.errno == errno.ENOTDIR:
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        return f"{blocking} is a file, not a folder" if blocking is not None else f"{path}: {exc.strerror}"
    created = Path(exc.filename) if getattr(exc, "filename", None) else None  # what was being made, if known
    where = created.parent if created is not None else path  # the folder it was being made in
    if isinstance(exc, PermissionError):
        return f"no permission to write in {where}"
    if exc.errno == errno.EROFS:
        return f"{where} is on a read-only file system"
    if exc.errno == errno.ENOENT:  # the parents exist (mkdir made them), yet nothing may be made here: /proc, /sys
        return f"{where} does not take new files or folders"
    return f"{created or path}: {exc.strerror or exc}"


def inside(root: Path, path: Path) -> Path | None:
    """`path` with its links followed when it lies inside `root` (not `root` itself), else None.

    The one test for a path that came from a file anyone may edit (a manifest row, PNG
    metadata): a link out of `root`, `..`, a link loop or an unreadable link is None.
    """
    try:
        top, found = Path(root).resolve(), Path(path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return None
    return found if found != top and top in found.parents else None


def make_folder(path: str | os.PathLike[str], what: str, hint: str) -> Path:
    """Create `path` (and its parents) if needed; a UserError naming what is in the way otherwise.

    what: the folder's role ("output folder", "cache folder $THREEDIS_CACHE"); hint: what to
    do instead ("choose another --out").
    """
    try:
        folder = Path(path).expanduser()
    except RuntimeError:  # "~" for a user without a home folder
        raise UserError(f"cannot use the {what} {os.fspath(path)}: this user has no home folder for '~'; {hint}") \
            from None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the {what}: {folder_problem(folder, exc)}; {hint}") from None
    if not folder.is_dir():  # a link to a file, or a file that appeared meanwhile
        raise UserError(f"cannot create the {what}: {folder} is a file, not a folder; {hint}")
    return folder


def unmakeable_folder(path: str | os.PathLike[str]) -> str | None:
    """None when `path` is a folder that takes new files, or one that could be made; else what is in the way.

    Why: a command checks its output folder before it imports torch, yet makes it only once every
    argument is checked (a refusal leaves nothing behind). So this makes nothing: a scratch folder
    is made and removed in the deepest folder on the way that exists, which is the step that fails
    for no permission, a read-only file system or /proc. The words are folder_problem's.
    """
    try:
        folder = Path(path).expanduser()
    except RuntimeError:
        return "this user has no home folder for '~'"
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        scratch = tempfile.mkdtemp(prefix=".threedis-probe-", dir=existing)
    except OSError as exc:
        return folder_problem(existing, exc)
    os.rmdir(scratch)
    return None


def check_folder_could_be_made(path: str | os.PathLike[str], what: str, hint: str) -> None:
    """unmakeable_folder as make_folder's UserError ("cannot create the <what>: <problem>; <hint>")."""
    problem = unmakeable_folder(path)
    if problem is not None:
        raise UserError(f"cannot create the {what}: {problem}; {hint}")


def cache_root() -> Path:
    """$THREEDIS_CACHE, else ~/.cache/threedis (read at each call: tests and apps may change it).

    The one place the cache folder is chosen (prompt embeddings, quantized weights, tiny
    checkpoints, the service's token); a user without a home folder is told to set the variable.
    """
    env = os.environ.get("THREEDIS_CACHE")
    if env:
        return Path(env)
    if not _has_home():
        raise UserError("no cache folder: this user has no home folder (for ~/.cache/threedis); set "
                        "$THREEDIS_CACHE to a folder you can write")
    return Path.home() / ".cache" / "threedis"


def _has_home() -> bool:
    try:
        Path.home()
    except (RuntimeError, KeyError):
        return False
    return True
