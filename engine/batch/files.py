"""Putting one item's files in place: DIR/<job-id>/seed-<s>.png, -depth.png, masks, report.

Workers send the files as bytes (a Ray worker may run on another machine), and
only the driver writes into DIR. Each file is written to a temporary name,
fsynced and renamed over any earlier copy (a set left by an interrupted run
whose manifest row never got written), so the folder holds each item once. Files
get the same modes as a render's (engine/outputs.replace_file), and a full or
read-only folder is one UserError.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from threedis import UserError
from threedis.engine.batch.manifest import resolve_inside
from threedis.engine.outputs import replace_file
from threedis.engine.paths import make_folder


def place_files(out: Path, job_id: str, files: dict[str, tuple[str, bytes]],
                stale: dict[str, str] | None = None) -> dict[str, str]:
    """Write kind -> (file name, bytes) into out/job_id; returns kind -> path relative to `out`.

    stale: the item's files from an earlier manifest row (kind -> relative path);
    those the new set does not replace are removed, so no leftovers mix with it.
    Only paths inside out/job_id are ever removed (the manifest is a file anyone may edit).
    """
    folder = make_folder(out / job_id, "job's output folder", f"move the file {out / job_id} away")
    written: dict[str, str] = {}
    try:
        for kind, (name, data) in files.items():
            if Path(name).name != name or name.startswith("."):
                raise UserError(f"refusing to write {name!r}: not a plain file name")  # pragma: no cover
            replace_file(folder / name, data)
            written[kind] = f"{job_id}/{name}"
    except BaseException:  # a full disk half-way: no image without its set and manifest row
        remove_placed(out, written.values())
        raise
    own = folder.resolve()
    for old in (stale or {}).values():
        path = resolve_inside(out, old) if old not in written.values() else None
        if path is not None and path.parent == own:
            path.unlink(missing_ok=True)
    return written


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remove_placed(out: Path, paths: Iterable[str]) -> None:
    """Take back an item's files (paths relative to `out`) when its set or its manifest row could not be written."""
    for path in paths:
        (out / path).unlink(missing_ok=True)
