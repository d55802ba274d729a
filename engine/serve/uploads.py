"""Uploaded images (depth maps, photos, instance masks): checked as real images, stored under new names.

The client's file name is never used: an upload is kept as uploads/<32 hex>.png, and
ids are checked against that pattern before they are joined to a path. The byte
limit is checked before PIL sees the data, the pixel limit from the header before
any pixel is decoded, and PIL's own decompression-bomb error is caught too.
"""

from __future__ import annotations

import io
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from threedis.engine.errors import UserError
from threedis.engine.serve.history import History

KINDS = ("depth", "photo", "mask")
_ID = re.compile(r"^[0-9a-f]{32}$")
_KEEP_MODES = {"depth": ("L", "RGB", "I;16"), "photo": ("RGB",), "mask": ("L",)}


class UploadError(UserError):
    """A refused upload; status is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StoredUpload:
    id: str
    kind: str
    width: int
    height: int
    path: Path

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "width": self.width, "height": self.height}


def _normalised(image: Image.Image, kind: str) -> Image.Image:
    """A mode PNG stores and the engine reads: masks 'L', photos 'RGB', depth 'L'/'RGB'/16-bit."""
    if image.mode in _KEEP_MODES[kind]:
        return image
    if kind == "depth" and image.mode in ("I", "F", "I;16B", "I;16L"):
        values = np.asarray(image, dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) / max(hi - lo, 1e-12) * 65535.0
        return Image.fromarray(scaled.round().astype(np.uint16))
    if kind == "mask":
        return image.convert("L")
    return image.convert("RGB")


class UploadStore:
    """Validates and keeps uploads in `folder`; their records live in the history database."""

    def __init__(self, folder: Path, history: History, max_bytes: int, max_pixels: int) -> None:
        self.folder, self.history = Path(folder), history
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, kind: str) -> StoredUpload:
        if kind not in KINDS:
            raise UploadError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if len(data) > self.max_bytes:
            raise UploadError(f"the file is {len(data)} bytes; the limit is {self.max_bytes} "
                              f"(--max-upload-mb)", status=413)
        if not data:
            raise UploadError("the file is empty; send a PNG or JPEG image")
        image = self._decode(data)
        upload_id = secrets.token_hex(16)
        path = self.folder / f"{upload_id}.png"
        tmp = self.folder / f".{upload_id}.tmp.png"
        try:
            _normalised(image, kind).save(tmp, format="PNG")
            os.replace(tmp, path)
        except OSError as exc:  # the service's disk, not the client's mistake
            tmp.unlink(missing_ok=True)
            raise UploadError(f"the service cannot store the upload: {exc.strerror or exc}", status=507) from None
        self.history.add_upload(upload_id, kind, image.width, image.height)
        return StoredUpload(upload_id, kind, image.width, image.height, path)

    def _decode(self, data: bytes) -> Image.Image:
        try:
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                width, height = probe.size
                if width * height > self.max_pixels:
                    raise UploadError(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                                      f"{self.max_pixels} (--max-upload-pixels)", status=413)
                probe.verify()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return image.copy()
        except UploadError:
            raise
        except Image.DecompressionBombError:
            raise UploadError("the image declares far more pixels than its size allows (a decompression bomb); "
                              "refused", status=413) from None
        except UnidentifiedImageError:
            raise UploadError("the file is not an image PIL can read; send a PNG or JPEG") from None
        except Exception as exc:  # truncated or corrupt files raise many types
            raise UploadError(f"the image is damaged ({type(exc).__name__}: {str(exc)[:100]}); "
                              f"send a complete PNG or JPEG") from None

    def get(self, upload_id: str, kind: str | tuple[str, ...] | None = None, field: str = "upload") -> StoredUpload:
        """The stored upload with this id (and kind), or a UserError naming `field`."""
        record = self.history.upload(upload_id) if isinstance(upload_id, str) and _ID.match(upload_id) else None
        path = self.folder / f"{upload_id}.png" if record is not None else None
        if record is None or not path.is_file():
            raise UploadError(f"{field}: no upload with id {str(upload_id)[:40]!r}; POST the image to "
                              f"/api/v1/uploads first", status=404 if field == "upload" else 422)
        kinds = (kind,) if isinstance(kind, str) else kind
        if kinds and record["kind"] not in kinds:
            raise UploadError(f"{field}: upload {upload_id} is a {record['kind']} image; this needs a "
                              f"{' or '.join(kinds)} upload")
        return StoredUpload(upload_id, record["kind"], record["width"], record["height"], path)
