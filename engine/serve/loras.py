"""LoRAs a job may use: the files of the folder the service was started with (--lora-dir), by name,
and LoRAs uploaded to the service, by id.

A job never gives a path: an answer that differs between "no such file" and "not a
LoRA" would tell any caller which paths exist on the machine. A name is looked up in
the folder's listing only (never joined to a path first), and uploads are stored as
OUT/loras/<32 hex>.safetensors after their safetensors header was read and checked.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import IO

from threedis.engine.errors import UserError
from threedis.engine.model_paths import lora_file
from threedis.engine.serve.history import History

SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 64 * 1024 * 1024  # a LoRA's header lists its tensors: kilobytes, a few MB at most
_ID = re.compile(r"^[0-9a-f]{32}$")
_LABEL = re.compile(r"[^\w.+ -]")


class LoraError(UserError):
    """A refused LoRA upload or a LoRA that is gone; status is the HTTP code."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _label(filename: str | None) -> str:
    """What the page shows for an uploaded LoRA: the client's file name, reduced to a harmless label."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = _LABEL.sub("_", base).strip()[:100]
    return base or "upload.safetensors"


class LoraStore:
    """The LoRA folder (read only) and the uploaded LoRAs (records in the history database)."""

    def __init__(self, folder: Path | None, uploads_dir: Path, history: History, max_bytes: int) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.uploads_dir, self.history, self.max_bytes = Path(uploads_dir), history, max_bytes

    # -- what exists ------------------------------------------------------------

    def named(self) -> dict[str, Path]:
        """name -> file of every LoRA in the folder: NAME.safetensors files, and folders holding one."""
        if self.folder is None or not self.folder.is_dir():
            return {}
        out: dict[str, Path] = {}
        for entry in sorted(os.scandir(self.folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_file() and entry.name.endswith(SUFFIX):
                out[entry.name] = path
            elif entry.is_dir():
                try:
                    out[entry.name] = lora_file(path)
                except UserError:  # not a LoRA folder (none or several files): not offered
                    continue
        return out

    def available(self) -> dict:
        """GET /loras: the folder's LoRAs by name, then the uploaded ones, newest first."""
        named = [{"name": name, "bytes": _size(path)} for name, path in self.named().items()]
        uploaded = [{"upload": r["id"], "name": r["label"], "bytes": r["bytes"]} for r in self.history.loras()]
        return {"folder": self.folder is not None, "named": named, "uploaded": uploaded}

    def problems(self, loras: list[dict]) -> list[tuple[str, str]]:
        """(field, message) for each requested LoRA that does not exist (options.loras[i])."""
        named = self.named() if any("name" in item for item in loras) else {}
        out = []
        for i, item in enumerate(loras):
            field = f"options.loras[{i}]"
            if "name" in item and item["name"] not in named:
                where = "its --lora-dir folder" if self.folder is not None else "no --lora-dir (none was given)"
                out.append((f"{field}.name", f"no LoRA named {item['name'][:80]!r} in the service's LoRAs "
                                             f"({where}); GET /api/v1/loras lists them"))
            elif "upload" in item and self._uploaded(item["upload"]) is None:
                out.append((f"{field}.upload", f"no uploaded LoRA with id {item['upload'][:40]!r}; "
                                               f"POST the file to /api/v1/loras first"))
        return out

    def _uploaded(self, upload_id: str) -> Path | None:
        if not isinstance(upload_id, str) or not _ID.match(upload_id) or self.history.lora(upload_id) is None:
            return None
        path = self.uploads_dir / f"{upload_id}{SUFFIX}"
        return path if path.is_file() else None

    def resolve(self, item: dict) -> tuple[Path, str]:
        """(file, label) of one job LoRA {name | upload, scale}; LoraError when it has gone since submission."""
        if "name" in item:
            path = self.named().get(item["name"])
            label = item["name"]
        else:
            path = self._uploaded(item["upload"])
            record = self.history.lora(item["upload"]) if path is not None else None
            label = f"{record['label']} (upload {item['upload']})" if record else f"upload {item['upload']}"
        if path is None:
            raise LoraError(f"LoRA {label[:80]!r} is no longer available to the service; choose another")
        return path, label

    # -- uploads ----------------------------------------------------------------

    def save(self, source: IO[bytes], filename: str | None) -> dict:
        """Copy an uploaded file into the store if it is a complete safetensors file with LoRA weights."""
        from threedis.engine.loading import safetensors_header  # imports torch: only when a LoRA comes in

        upload_id = secrets.token_hex(16)
        tmp = self.uploads_dir / f".{upload_id}.tmp"
        try:
            self.uploads_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out:
                copied = _copy_capped(source, out, self.max_bytes)
            if copied < 0:
                raise LoraError(f"the LoRA file is larger than the limit of {self.max_bytes} bytes "
                                f"(--max-lora-mb)", status=413)
            if copied == 0:
                raise LoraError("the file is empty; send a .safetensors LoRA")
            try:
                header = safetensors_header(tmp, MAX_HEADER_BYTES)
            except ValueError as err:
                raise LoraError(f"not a LoRA file: {err} (send a .safetensors LoRA; pickled "
                                f".bin/.pt/.ckpt files are not taken)") from None
            if not any("lora" in key.lower() for key in header if key != "__metadata__"):
                raise LoraError("the safetensors file holds no LoRA weights (no tensor name contains 'lora')")
            os.replace(tmp, self.uploads_dir / f"{upload_id}{SUFFIX}")
        except OSError as exc:  # the service's disk, not the client's mistake
            raise LoraError(f"the service cannot store the LoRA: {exc.strerror or exc}", status=507) from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        label = _label(filename)
        self.history.add_lora(upload_id, label, copied, time.time())
        return {"upload": upload_id, "name": label, "bytes": copied}


def _copy_capped(source: IO[bytes], out: IO[bytes], limit: int) -> int:
    """Bytes copied, or -1 once more than `limit` came (the rest is not read)."""
    copied = 0
    while True:
        chunk = source.read(1024 * 1024)
        if not chunk:
            return copied
        copied += len(chunk)
        if copied > limit:
            return -1
        out.write(chunk)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None

