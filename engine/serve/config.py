"""The service's settings: one frozen object built by the CLI (or a test) and read by every part."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 7860
MB = 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """Where the service listens, which models it serves, where it keeps outputs, and its limits.

    token: the bearer token every API call must carry (None: --no-auth).
    model None: the tiny built-in checkpoints (as `threedis demo`), said so on the page.
    lora_dir: the folder whose LoRA files jobs may name (None: uploaded LoRAs only).
    preview_every: a preview image is sent every this many denoising steps (0: about 8 per render).
    """

    out: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    model: str | None = None
    profile: str = "auto"
    stage1: str | None = None
    sam: str | None = None
    depth_model: str | None = None
    device: str | None = None
    local_files_only: bool = False
    allow_origins: tuple[str, ...] = ()
    max_upload_bytes: int = 32 * MB
    max_upload_pixels: int = 4096 * 4096
    max_lora_bytes: int = 2048 * MB
    lora_dir: Path | None = None
    max_json_bytes: int = 1 * MB
    max_queue: int = 1000
    preview_every: int = 0  # 0: about 8 previews per render

    @property
    def tiny(self) -> bool:
        return self.model is None

    @property
    def history_path(self) -> Path:
        return Path(self.out) / "history.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return Path(self.out) / "jobs"

    @property
    def uploads_dir(self) -> Path:
        return Path(self.out) / "uploads"

    @property
    def loras_dir(self) -> Path:
        """Where uploaded LoRAs are kept (the --lora-dir folder is only read)."""
        return Path(self.out) / "loras"

    def limits(self) -> dict:
        """What clients may send, for /system (so an editor can check before uploading)."""
        return {"max_upload_bytes": self.max_upload_bytes, "max_upload_pixels": self.max_upload_pixels,
                "max_lora_bytes": self.max_lora_bytes, "max_json_bytes": self.max_json_bytes,
                "max_queue": self.max_queue}
