"""Putting one item's files in place: DIR/<job-id>/seed-<s>.png, -depth.png, masks, report.

Workers send the files as bytes (a Ray worker may run on another machine), and
only the driver writes into DIR. Each file is written to a temporary name,
fsynced and renamed over any earlier copy (a set left by an interrupted run
whose manifest row never got written), so the folder holds each item once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from threedis import UserError
from threedis.engine.paths import make_folder


def place_files(out: Path, job_id: str, files: dict[str, tuple[str, bytes]],
                stale: dict[str, str] | None = None) -> dict[str, str]:
    """Write kind -> (file name, bytes) into out/job_id; returns kind -> path relative to `out`.

    stale: the item's files from an earlier manifest row (kind -> relative path);
    those the new set does not replace are removed, so no leftovers mix with it.
    """
    folder = make_folder(out / job_id, "job's output folder", f"move the file {out / job_id} away")
    written: dict[str, str] = {}
    for kind, (name, data) in files.items():
        if Path(name).name != name or name.startswith("."):
            raise UserError(f"refusing to write {name!r}: not a plain file name")  # pragma: no cover
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written[kind] = f"{job_id}/{name}"
    for old in (stale or {}).values():
        if old not in written.values() and Path(old).parts[:1] == (job_id,):
            (out / old).unlink(missing_ok=True)
    return written


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
