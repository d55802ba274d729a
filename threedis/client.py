"""A small Python client for `threedis serve` (standard library only: no torch, no FastAPI).

    from threedis.client import Client
    client = Client("http://127.0.0.1:7860", token)
    job = client.submit(layout, steps=20, seed=3)
    final = client.wait(job, on_progress=lambda job: print(job["stage"], job["step"], job["total"]))
    client.download(job, "image.png", "out.png")

Every error the service answers with becomes a ClientError carrying its message,
HTTP status and per-field problems. Other languages use the HTTP API (docs/api.md).
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import os
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

__all__ = ["Client", "ClientError", "FINAL_STATUSES"]

FINAL_STATUSES = ("done", "failed", "cancelled", "interrupted")
_OPTION_NAMES = ("seed", "steps", "guidance", "schedule", "sam", "depth", "loras", "preview")


class ClientError(Exception):
    """The service refused a request (or could not be reached): message, status (0: no answer), problems."""

    def __init__(self, message: str, status: int = 0, problems: list | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.problems = problems or []


class Client:
    """One service at `url`; `token` is printed by `threedis serve` (None with --no-auth)."""

    def __init__(self, url: str = "http://127.0.0.1:7860", token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    # -- plumbing -------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, data: bytes | None = None,
                 content_type: str | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            data, content_type = json.dumps(body).encode("utf-8"), "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(f"{self.url}/api/v1{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            raise _error_of(err) from None
        except urllib.error.URLError as err:
            raise ClientError(f"cannot reach {self.url}: {err.reason}") from None
        return json.loads(raw) if "json" in kind else raw

    # -- the API --------------------------------------------------------------

    def system(self) -> dict:
        return self._request("GET", "/system")

    def submit(self, layout: Any, **options: Any) -> str:
        """Queue a render of `layout` (a dict, a Layout, or a JSON file path); returns the job id.

        options: seed, steps, guidance, schedule, sam, depth, loras, preview as in docs/api.md,
        e.g. depth={"source": "upload", "upload": client.upload("depth.png", "depth")}.
        """
        return self._submit("/jobs", layout, options)

    def submit_depth(self, layout: Any, **options: Any) -> str:
        """Queue a depth-only job (stage 1, or depth={"source": "photo", "upload": id}); returns its id."""
        return self._submit("/depth", layout, options)

    def _submit(self, path: str, layout: Any, options: dict) -> str:
        unknown = [k for k in options if k not in _OPTION_NAMES]
        if unknown:
            raise ClientError(f"unknown option {unknown[0]!r}; options are: {', '.join(_OPTION_NAMES)}")
        return self._request("POST", path, {"layout": _layout_dict(layout), "options": options})["id"]

    def status(self, job_id: str) -> dict:
        return self._request("GET", f"/jobs/{job_id}")

    def jobs(self, status: str | None = None, kind: str | None = None, limit: int = 500, offset: int = 0) -> list[dict]:
        """Jobs, newest first; status / kind filter them ("done", "failed,cancelled"; "render" | "depth")."""
        query = {"limit": limit, "offset": offset, **({"status": status} if status else {}),
                 **({"kind": kind} if kind else {})}
        return self._request("GET", "/jobs?" + urllib.parse.urlencode(query))["jobs"]

    def loras(self) -> dict:
        """The LoRAs jobs may use: {"named": [...] from the service's --lora-dir, "uploaded": [...]}."""
        return self._request("GET", "/loras")

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/jobs/{job_id}/cancel")

    def resubmit(self, job_id: str) -> str:
        return self._request("POST", f"/jobs/{job_id}/resubmit")["id"]

    def plan(self, layout: Any, profile: str | None = None, stage1: bool = False, sam: bool = False) -> dict:
        body: dict[str, Any] = {"layout": _layout_dict(layout), "stage1": stage1, "sam": sam}
        if profile is not None:
            body["profile"] = profile
        return self._request("POST", "/plan", body)

    def wait(self, job_id: str, on_progress: Callable[[dict], None] | None = None, timeout: float | None = None,
             poll_s: float = 0.25) -> dict:
        """Poll until the job is done, failed, cancelled or interrupted; returns its final record.

        on_progress(job) is called whenever its status, stage or step changes. A job that
        ends other than done is returned, not raised: check job["status"] and job["error"].
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            job = self.status(job_id)
            seen = (job["status"], job["stage"], job["step"])
            if on_progress is not None and seen != last:
                on_progress(job)
            last = seen
            if job["status"] in FINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"job {job_id} is still {job['status']} after {timeout} s")
            time.sleep(poll_s)

    def download(self, job_id: str, name: str = "image.png", path: str | os.PathLike | None = None,
                 overwrite: bool = False) -> Path:
        """Save one output file of the job (image.png keeps its PNG metadata); returns the path written.

        An existing file is kept (ClientError) unless overwrite=True; the file appears whole or not at all.
        """
        target = Path(path) if path is not None else Path(name)
        if target.exists() and not overwrite:
            raise ClientError(f"{target} exists; pass overwrite=True or another path")
        data = self._request("GET", f"/jobs/{job_id}/files/{name}")
        if not isinstance(data, bytes):
            data = json.dumps(data, indent=2).encode("utf-8")
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            if overwrite:
                os.replace(tmp, target)
            elif not _placed_new(tmp, target, data):  # it appeared meanwhile: never overwritten by surprise
                raise ClientError(f"{target} exists; pass overwrite=True or another path")
        except OSError as err:
            where = f" ({err.filename})" if err.filename and Path(err.filename) != target else ""
            raise ClientError(f"cannot write {target}: {err.strerror or err}{where}") from None
        finally:
            with contextlib.suppress(OSError):  # its folder may not exist, or be a file
                tmp.unlink(missing_ok=True)
        return target

    def upload(self, path: str | os.PathLike, kind: str) -> str:
        """Upload an image file as a depth map, photo or mask ('depth' | 'photo' | 'mask'); returns its id."""
        file = Path(path)
        mime = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        return self._post_file("/uploads", file, "upload", mime, {"kind": kind})["id"]

    def upload_lora(self, path: str | os.PathLike) -> str:
        """Upload a .safetensors LoRA; returns its id, for loras=[{"upload": id, "scale": 0.8}]."""
        file = Path(path)
        return self._post_file("/loras", file, _form_name(file.name), "application/octet-stream")["upload"]

    def _post_file(self, path: str, file: Path, filename: str, mime: str, fields: dict | None = None) -> Any:
        """POST a multipart form: the text `fields`, then `file` as the field "file"."""
        boundary = secrets.token_hex(16)
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                 for name, value in (fields or {}).items()]
        parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                  f"Content-Type: {mime}\r\n\r\n".encode(), file.read_bytes(), f"\r\n--{boundary}--\r\n".encode()]
        return self._request("POST", path, data=b"".join(parts),
                             content_type=f"multipart/form-data; boundary={boundary}")


def _form_name(name: str) -> str:
    """A file name safe inside a multipart header (the service only shows it as a label)."""
    return "".join(c if c.isprintable() and c not in '"\\\r\n' else "_" for c in name)[:100] or "lora.safetensors"


def _layout_dict(layout: Any) -> dict:
    if isinstance(layout, (str, os.PathLike)):
        return json.loads(Path(layout).read_text(encoding="utf-8"))
    if hasattr(layout, "to_dict"):
        return layout.to_dict()
    return layout


def _error_of(err: urllib.error.HTTPError) -> ClientError:
    try:
        detail = json.loads(err.read()).get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, dict):
        return ClientError(detail.get("message") or f"HTTP {err.code}", err.code, detail.get("problems"))
    return ClientError(str(detail) if detail else f"HTTP {err.code} {err.reason}", err.code)


def _placed_new(tmp: Path, target: Path, data: bytes) -> bool:
    """Put the whole file at `target` only if nothing is there (False if something is): a hard link of
    the finished temp file, or where the file system has none (exFAT, some shares) an exclusive create."""
    try:
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise
        except OSError:
            with open(target, "xb") as handle:
                handle.write(data)
    except FileExistsError:
        return False
    return True
