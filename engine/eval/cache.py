"""Per-image results kept beside the run, so an evaluation resumes and a re-evaluation is free.

One JSONL line per scored image, appended and flushed as soon as it is measured:
the key is the image's sha256 and its prompt's truth (labels, boxes); a line only
counts for the same models and protocol version. A changed image, other models or
another protocol version simply find nothing. Unreadable lines (a torn last line)
are ignored; a folder that cannot be written gives one warning and no cache.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from threedis.engine.errors import ThreedisWarning
from threedis.engine.eval.protocol import PROTOCOL_VERSION
from threedis.engine.eval.score import InstanceMeasure
from threedis.engine.outputs import open_appending

CACHE_NAME = "eval-mig-cache.jsonl"


def beside_source(kind: str, path: Path, name: str) -> Path:
    """RUN_DIR/<name> for a run; FOLDER.<name> beside a plain folder (never inside it: the reference
    evaluator would take every file in it for an image). Where the cache and the results go."""
    if kind == "run":
        return path / name
    return path.resolve().parent / f"{path.resolve().name}.{name}"


class ResultCache:
    """image sha256 + truth key -> the measures of its instances, for one pair of models."""

    def __init__(self, path: Path | None, models: list[str]) -> None:
        self.path = path
        self.models = list(models)
        self.entries: dict[str, list[InstanceMeasure]] = {}
        self._file: Any = None
        self._broken = path is None
        if path is not None:
            self._read(path)

    def _read(self, path: Path) -> None:
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._warn(f"cannot read {path} ({exc.strerror or exc}); measuring again")
            return
        for line in lines:
            try:
                row = json.loads(line)
                if row["models"] != self.models or row["protocol"] != PROTOCOL_VERSION:
                    continue
                self.entries[row["key"]] = [InstanceMeasure.from_list(m) for m in row["measures"]]
            except (ValueError, KeyError, TypeError):
                continue

    @staticmethod
    def key(sha256: str, truth_key: str) -> str:
        return f"{sha256}:{truth_key}"

    def get(self, key: str) -> list[InstanceMeasure] | None:
        return self.entries.get(key)

    def put(self, key: str, measures: list[InstanceMeasure]) -> None:
        self.entries[key] = measures
        if self._broken:
            return
        line = json.dumps({"key": key, "models": self.models, "protocol": PROTOCOL_VERSION,
                           "measures": [m.to_list() for m in measures]}) + "\n"
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open_appending(self.path)
            self._file.write(line)
            self._file.flush()
        except OSError as exc:
            self._broken = True
            self._warn(f"cannot write the result cache {self.path} ({exc.strerror or exc}); results of this run "
                       f"are not kept (--cache FILE puts it elsewhere)")

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError:
                pass
            self._file.close()
            self._file = None

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, ThreedisWarning, stacklevel=3)
