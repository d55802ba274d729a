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
from threedis.engine.paths import folder_problem, make_folder, unmakeable_folder
from threedis.engine.tiny_rules import MARKER, cache_root  # noqa: F401  (MARKER: written last = complete)

IMAGENET_MEAN = [0.485, 0.456, 0.406]  # what the real SAM2 and Depth Anything preprocessors normalise with
IMAGENET_STD = [0.229, 0.224, 0.225]

# Folders no checkpoint belongs in (POSIX): the root and the system trees, refused with anything below them...
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys",
                 "/usr")
# ...and shared top-level folders, refused themselves (a subfolder such as /tmp/tiny is fine).
_SHARED_ROOTS = ("/", "/home", "/media", "/mnt", "/opt", "/root", "/run", "/srv", "/tmp", "/var")


def seeded(seed: int, offset: int) -> None:
    """Each component gets its own stream so adding one never shifts another's weights.

    Taken modulo 2^64 (torch's seed range), so every seed in 0..2^64-1 works and the
    seeds below 2^64/1000 keep the bytes they always had.
    """
    torch.manual_seed((seed * 1000 + offset) % 2**64)


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
    from_env = root is None and bool(os.environ.get("THREEDIS_CACHE"))
    what = "cache folder $THREEDIS_CACHE" if from_env else "cache folder"
    hint = "set $THREEDIS_CACHE to a folder you can write (tiny checkpoints, prompt and weight caches go there)"
    make_folder(base, what, hint)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dir_name}.", dir=base))
    except OSError as exc:
        raise UserError(f"cannot build {dir_name} in the {what}: {folder_problem(base, exc)}; {hint}") from None
    try:
        try:
            writer(tmp)
        except OSError as exc:  # a full disk or a quota while writing
            raise UserError(f"cannot build {dir_name} in the {what}: {folder_problem(tmp, exc)}; {hint}") from None
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


def example_clause(instead: Path | None) -> str:
    """", e.g. <folder>" for messages: `instead`, else one under the cache; nothing when there is no cache
    folder or this user could not make the example (a home folder that is not there or not theirs)."""
    try:
        example = instead or cache_root() / "make-tiny"
    except UserError:
        return ""
    return "" if unmakeable_folder(example) is not None else f", e.g. {example}"


@contextlib.contextmanager
def new_folder_guard(root: Path, hint: str) -> Iterator[Path]:
    """Create `root` for a writer that fills it; if anything fails, leave it as it was found.

    `root` is new or empty (check_new_folder): on a failure or an interrupt what was written
    is removed (the folder too, when made here), so a second try is not refused as "not
    empty"; an OSError (no permission, a read-only or full disk) becomes one UserError.
    """
    existed = root.is_dir()
    make_folder(root, "folder", hint)
    try:
        yield root
    except BaseException as exc:
        with contextlib.suppress(OSError):  # the clean-up never hides the failure itself
            if not existed:
                shutil.rmtree(root)
            for entry in list(root.iterdir()) if existed else []:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if isinstance(exc, OSError):
            raise UserError(f"cannot write into {root}: {folder_problem(root, exc)}; {hint}") from None
        raise


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
    safe = f"choose a new folder{example_clause(instead)}"
    try:
        given = Path(path).expanduser()
    except RuntimeError:  # "~" for a user without a home folder
        raise UserError(f"{path}: this user has no home folder for '~'; {safe}") from None
    resolved = given.resolve()
    if resolved.exists() and not resolved.is_dir():
        raise UserError(f"{given} is a file, not a folder; {safe}")
    try:
        full = resolved.is_dir() and any(resolved.iterdir())
    except OSError as exc:
        raise UserError(f"cannot look into {given}: {exc.strerror or exc}; {safe}") from None
    if full:
        raise UserError(f"{given} exists and is not empty; {safe}")
    if os.name == "posix" and (any(_is_within(resolved, tree) for tree in _SYSTEM_TREES)
                               or str(resolved) in _SHARED_ROOTS or resolved == Path.home().resolve()):
        raise UserError(f"{given} is a system or shared folder; {safe}")
    for name in real_names:
        if resolved.name.lower() == name.rsplit("/", 1)[-1].lower():
            raise UserError(f"{given} is named like the real model {name}; random test weights there would be "
                            f"taken for it: {safe}")
    return resolved
