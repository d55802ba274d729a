"""The job and upload records, in SQLite beside the outputs, so a restarted service remembers them.

One connection shared by the event loop and the render worker, guarded by a lock
(sqlite3's own objects are not safe to use from two threads at once); WAL so that
readers never wait for the worker's writes. JSON columns hold the layout, options,
warnings and the output file names.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

LIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled", "interrupted")
_JSON_COLUMNS = ("layout", "options", "warnings", "files")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    layout TEXT NOT NULL,
    options TEXT NOT NULL,
    error TEXT,
    warnings TEXT NOT NULL DEFAULT '[]',
    files TEXT NOT NULL DEFAULT '{}',
    resubmitted_from TEXT
);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS loras (
    id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created REAL NOT NULL
);
"""


class History:
    """Jobs (newest first) and uploads; every method is safe to call from any thread."""

    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs -------------------------------------------------------------------

    def add_job(self, job_id: str, kind: str, layout: dict, options: dict, resubmitted_from: str | None = None) -> dict:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, kind, status, created, layout, options, resubmitted_from) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, kind, time.time(), json.dumps(layout), json.dumps(options), resubmitted_from))
        return self.job(job_id)

    def update_job(self, job_id: str, **values: Any) -> None:
        if not values:
            return
        names = ", ".join(f"{key} = ?" for key in values)
        params = [json.dumps(v) if k in _JSON_COLUMNS else v for k, v in values.items()]
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {names} WHERE id = ?", (*params, job_id))

    def job(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _decode(row) if row is not None else None

    def jobs(self, limit: int = 500, offset: int = 0, statuses: tuple[str, ...] = (),
             kinds: tuple[str, ...] = ()) -> list[dict]:
        """Newest first; `statuses` / `kinds` keep only those (empty: all)."""
        where, params = _filters(statuses, kinds)
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs{where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                                    (*params, limit, offset)).fetchall()
        return [_decode(row) for row in rows]

    def count(self, statuses: tuple[str, ...] = (), kinds: tuple[str, ...] = ()) -> int:
        where, params = _filters(statuses, kinds)
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM jobs{where}", params).fetchone()[0])

    def interrupt_live(self) -> list[str]:
        """At start-up: jobs left queued or running by a stopped service become 'interrupted'."""
        with self._lock:
            ids = [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE status IN ('queued', 'running')")]
            self._db.execute("UPDATE jobs SET status = 'interrupted', finished = ?, "
                             "error = COALESCE(error, 'the service stopped before this job finished; resubmit it') "
                             "WHERE status IN ('queued', 'running')", (time.time(),))
        return ids

    # -- uploads ----------------------------------------------------------------

    def add_upload(self, upload_id: str, kind: str, width: int, height: int) -> None:
        with self._lock:
            self._db.execute("INSERT INTO uploads (id, kind, width, height, created) VALUES (?, ?, ?, ?, ?)",
                             (upload_id, kind, width, height, time.time()))

    def upload(self, upload_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM uploads WHERE id = ?", (upload_id,)).fetchone()
        return dict(row) if row is not None else None

    # -- uploaded LoRAs -----------------------------------------------------------

    def add_lora(self, lora_id: str, label: str, size: int, created: float) -> None:
        with self._lock:
            self._db.execute("INSERT INTO loras (id, label, bytes, created) VALUES (?, ?, ?, ?)",
                             (lora_id, label, size, created))

    def lora(self, lora_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM loras WHERE id = ?", (lora_id,)).fetchone()
        return dict(row) if row is not None else None

    def loras(self) -> list[dict]:
        with self._lock:
            return [dict(row) for row in self._db.execute("SELECT * FROM loras ORDER BY created DESC")]


def _filters(statuses: tuple[str, ...], kinds: tuple[str, ...]) -> tuple[str, tuple]:
    """A WHERE clause (placeholders only) for the job filters."""
    parts, params = [], []
    for column, values in (("status", statuses), ("kind", kinds)):
        if values:
            parts.append(f"{column} IN ({', '.join('?' * len(values))})")
            params.extend(values)
    return (" WHERE " + " AND ".join(parts) if parts else ""), tuple(params)


def _decode(row: sqlite3.Row) -> dict:
    out = dict(row)
    for key in _JSON_COLUMNS:
        out[key] = json.loads(out[key]) if out[key] is not None else None
    return out
