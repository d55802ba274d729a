"""Where tiny checkpoints live and how every writer finishes one: marker, permissions, cache, safe targets.

Why one module: the four writers (FLUX, LDM3D, SAM2, Depth Anything) share the cache
folder, the "marker written last means complete" rule, the atomic build-then-rename
into the cache, and the checks that keep `threedis make-tiny` from writing random
weights where real ones are expected (a system folder, a non-empty folder, a folder
named like the real model).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from threedis.engine.errors import UserError
from threedis.engine.tiny_rules import MARKER, cache_root  # noqa: F401  (MARKER: written last = complete)

IMAGENET_MEAN = [0.485, 0.456, 0.406]  # what the real SAM2 and Depth Anything preprocessors normalise with
IMAGENET_STD = [0.229, 0.224, 0.225]

# Folders no checkpoint belongs in (POSIX): the root and the system trees, refused with anything below them...
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys",
                 "/usr")
# ...and shared top-level folders, refused themselves (a subfolder such as /tmp/tiny is fine).
_SHARED_ROOTS = ("/", "/home", "/media", "/mnt", "/opt", "/root", "/run", "/srv", "/tmp", "/var")


def seeded(seed: int, offset: int) -> None:
    """Each component gets its own stream so adding one never shifts another's weights."""
    torch.manual_seed(seed * 1000 + offset)


@contextlib.contextmanager
def quiet_saves() -> Iterator[None]:
    """Hide transformers' per-shard progress bar while saving, restoring it afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def write_json(file: Path, obj: Any, indent: int | None = 2) -> None:
    file.write_text(json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def plain_lists(value: Any) -> Any:
    """Config values as plain lists/dicts: transformers' strict configs reject tuples in some fields."""
    if isinstance(value, Mapping):
        return {k: plain_lists(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain_lists(v) for v in value]
    return value


def start_folder(path: str | os.PathLike[str], marker: str = MARKER) -> Path:
    """Create `path` if needed and drop an old marker, so a crash mid-write never looks complete."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / marker).unlink(missing_ok=True)
    return path


def _default_modes(folder: Path) -> tuple[int, int]:
    """(file mode, folder mode) that the process umask gives new files here, found without touching the umask.

    os.umask() can only be read by setting it, which races with other threads.
    """
    probe = folder / f".mode-probe-{uuid.uuid4().hex}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        file_mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()
    return file_mode, file_mode | (file_mode & 0o444) >> 2  # folders: searchable wherever readable


def make_readable(root: Path, include_root: bool = False) -> None:
    """Give everything under `root` the modes a plain new file or folder gets (e.g. 0644/0755).

    safetensors writes weights 0600 and tempfile makes folders 0700, so without this
    other users of a shared cache or model folder could not read the checkpoint.
    `root` itself keeps its mode (a user's own empty folder stays as they made it)
    unless `include_root`.
    """
    file_mode, folder_mode = _default_modes(root)
    for folder, _, files in os.walk(root):
        if include_root or folder != str(root):
            os.chmod(folder, folder_mode)
        for name in files:
            os.chmod(os.path.join(folder, name), file_mode)


def mark_complete(path: Path, marker: str, version: int, seed: int) -> Path:
    """Last step of every writer: readable modes, then the marker that says the folder is complete."""
    make_readable(path)
    write_json(path / marker, {"version": version, "seed": seed})
    return path


def finish_transformers_checkpoint(path: Path, model: Any, preprocessor: Mapping[str, Any], version: int,
                                   seed: int) -> Path:
    """Save a transformers model (safetensors) and its preprocessor_config.json, then mark the folder complete."""
    with quiet_saves():
        model.save_pretrained(path, safe_serialization=True)
    write_json(path / "preprocessor_config.json", plain_lists(preprocessor))
    return mark_complete(path, MARKER, version, seed)


def marker_version(path: Path, marker: str = MARKER) -> int | None:
    try:
        return json.loads((path / marker).read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError, AttributeError):
        return None


def cached_build(root: str | os.PathLike[str] | None, dir_name: str, version: int,
                 writer: Callable[[Path], Any], marker: str = MARKER) -> Path:
    """`root/dir_name` holding a complete checkpoint of `version`, built by `writer(folder)` if needed.

    Built in a temporary sibling folder and renamed into place, so a crash or a
    concurrent builder never leaves a half-written folder that looks complete.
    """
    base = Path(root) if root is not None else cache_root()
    target = base / dir_name
    if marker_version(target, marker) == version:
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dir_name}.", dir=base))
    try:
        writer(tmp)
        make_readable(tmp, include_root=True)  # mkdtemp made it 0700
        if target.exists() and marker_version(target, marker) != version:
            shutil.rmtree(target)  # incomplete or stale: replace it
        try:
            os.rename(tmp, target)
        except OSError:
            if marker_version(target, marker) != version:  # not a concurrent builder's result
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_within(path: Path, tree: str) -> bool:
    return path == Path(tree) or Path(tree) in path.parents


def check_new_folder(path: str | os.PathLike[str], real_names: Iterable[str] = (),
                     instead: Path | None = None) -> Path:
    """`path` resolved, or a UserError if a tiny checkpoint must not be written there.

    Refused: a file, a non-empty folder, a system folder (or the home folder itself),
    and a folder named like a real model (`real_names`: hub ids or names), where
    random weights would later be taken for the real ones. `instead`: the folder the
    message suggests (default: one under the cache).
    """
    given = Path(path).expanduser()
    resolved = given.resolve()
    safe = f"choose a new folder, e.g. {instead or cache_root() / 'make-tiny'}"
    if resolved.is_file():
        raise UserError(f"{given} is a file; {safe}")
    if resolved.is_dir() and any(resolved.iterdir()):
        raise UserError(f"{given} exists and is not empty; {safe}")
    if os.name == "posix" and (any(_is_within(resolved, tree) for tree in _SYSTEM_TREES)
                               or str(resolved) in _SHARED_ROOTS or resolved == Path.home().resolve()):
        raise UserError(f"{given} is a system or shared folder; {safe}")
    for name in real_names:
        if resolved.name.lower() == name.rsplit("/", 1)[-1].lower():
            raise UserError(f"{given} is named like the real model {name}; random test weights there would be "
                            f"taken for it: {safe}")
    return resolved
