"""DIR/manifest.jsonl: one row per finished item, appended (flush + fsync) by the driver only.

The latest row of an item wins. Resuming reads it back: an item is skipped when
its last row says done, its job is unchanged (same job key) and its image is on
disk with the recorded sha256; a failed item is skipped unless --retry-failed.
A torn last line (the machine went down mid-write) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from threedis.engine.batch.jobs import Item
from threedis.engine.paths import make_folder

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
            if isinstance(row, dict) and "job" in row and "seed" in row:
                rows.append(row)
    return rows


def latest_rows(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        out[(row["job"], row["seed"])] = row
    return out


@dataclass
class ResumePlan:
    """What this run does with each item: render it, or skip it (with why)."""

    to_run: list[Item]
    skipped: list[tuple[Item, str]]
    previous: dict[tuple[str, int], dict[str, Any]]


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
                skipped.append((item, "failed before (--retry-failed renders it again)"))
        elif row.get("status") == "done":
            image = row.get("files", {}).get("image")
            if image and row.get("sha256") and sha256_file(out / image) == row["sha256"]:
                skipped.append((item, "done"))
            else:  # missing or changed on disk: make it again
                to_run.append(item)
        else:
            to_run.append(item)
    return ResumePlan(to_run=to_run, skipped=skipped, previous=previous)


class ManifestWriter:
    """Appends rows durably: each row is one line, flushed and fsynced before the next item is recorded."""

    def __init__(self, out: Path) -> None:
        self.path = out / MANIFEST_NAME
        make_folder(out, "output folder", "choose another --out")
        needs_newline = self.path.is_file() and self.path.stat().st_size > 0 and not self._ends_with_newline()
        self._file = open(self.path, "a", encoding="utf-8")
        if needs_newline:  # a torn last line: start ours on a fresh line
            self._file.write("\n")

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def append(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
