"""DIR/manifest.jsonl: one row per finished item, appended (flush + fsync) by the driver only.

The latest row of an item wins. Resuming reads it back: an item is skipped when
its last row says done, its job is unchanged (same job key), its image is on
disk with the recorded sha256 and every other file the row lists (depth map,
masks, report) is there too; a failed item is skipped unless --retry-failed.
Paths in a row are only followed inside the run folder. A torn last line (the
machine went down mid-write) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from threedis import UserError
from threedis.engine.batch.jobs import Item
from threedis.engine.outputs import open_appending
from threedis.engine.paths import inside, make_folder

MANIFEST_NAME = "manifest.jsonl"


def sha256_file(path: Path) -> str | None:
    """Hex sha256 of a file, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every readable row of a manifest, in order (unreadable lines, e.g. a torn last one, are skipped)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for text in f:
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("job"), str) and "seed" in row and (
                    row["seed"] is None or type(row["seed"]) is int):  # None: a bad line's one row
                rows.append(row)
    return rows


def resolve_inside(out: Path, relative: object) -> Path | None:
    """out / relative when that names a file path inside `out` (symlinks resolved), else None.

    A manifest is a file a user (or anyone with write access) can edit: a path such as
    ../../etc/passwd or an absolute one must never be read, hashed or trusted as an output.
    """
    if not isinstance(relative, str) or not relative or "\0" in relative or Path(relative).is_absolute():
        return None
    return inside(out, out / relative)


def latest_rows(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int | None], dict[str, Any]]:
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        out[(row["job"], row["seed"])] = row
    return out


DONE = "done"
FAILED_BEFORE = "failed before (--retry-failed renders it again)"


@dataclass
class ResumePlan:
    """What this run does with each item: render it, or skip it (with why)."""

    to_run: list[Item]
    skipped: list[tuple[Item, str]]  # why: DONE or FAILED_BEFORE
    previous: dict[tuple[str, int], dict[str, Any]]

    @property
    def failed_before(self) -> int:
        """Skipped items that failed in an earlier run (the batch's exit code stays non-zero for them)."""
        return sum(1 for _, why in self.skipped if why == FAILED_BEFORE)


def plan_resume(items: Iterable[Item], out: Path, retry_failed: bool) -> ResumePlan:
    """Split items into those to render and those already finished according to the manifest."""
    previous = latest_rows(read_rows(out / MANIFEST_NAME))
    to_run, skipped = [], []
    for item in items:
        row = previous.get((item.job.id, item.seed))
        if row is None or row.get("job_key") != item.job.key:
            to_run.append(item)
        elif row.get("status") == "failed":
            if retry_failed:
                to_run.append(item)
            else:
                skipped.append((item, FAILED_BEFORE))
        elif row.get("status") == "done":
            if _files_intact(out, row):
                skipped.append((item, DONE))
            else:  # missing, changed or outside the run folder: make it again
                to_run.append(item)
        else:
            to_run.append(item)
    return ResumePlan(to_run=to_run, skipped=skipped, previous=previous)


def _files_intact(out: Path, row: dict[str, Any]) -> bool:
    """The row's image has its recorded sha256 and every file it lists exists, all inside `out`."""
    files = row.get("files")
    if not isinstance(files, dict) or not isinstance(row.get("sha256"), str):
        return False
    paths = {kind: resolve_inside(out, rel) for kind, rel in files.items()}
    if paths.get("image") is None or any(p is None or not p.is_file() for p in paths.values()):
        return False
    return sha256_file(paths["image"]) == row["sha256"]


class ManifestWriter:
    """Appends rows durably: each row is one line, flushed and fsynced before the next item is recorded."""

    def __init__(self, out: Path) -> None:
        self.path = out / MANIFEST_NAME
        make_folder(out, "output folder", "choose another --out")
        try:
            self._file = open_appending(self.path)
        except OSError as exc:
            raise UserError(f"cannot write the manifest {self.path}: {exc.strerror or exc}; check the folder's "
                            f"permissions or choose another --out") from None

    def append(self, row: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(row, sort_keys=True, default=str) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise UserError(f"cannot write the manifest {self.path}: {exc.strerror or exc}; free some space and "
                            f"run the same command again to resume") from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # a full disk: the failed append already said so
