"""What every part of the GPU check shares: its rows file, its clock, and the device and versions in each row.

Why: the GPU machine is lent briefly and a command is killed at its time limit, so each
measurement is appended to the rows file and flushed the moment it is made (a cut-off
run keeps every finished row), and each row says on which card, driver and package
versions it was made, so a file read months later still says where it came from.
Imports no torch (float32_settings does, when a part calls it): the orchestrator
(bench/gpu_check.py) must not create a CUDA context of its own, which would count as
memory outside the measured process's allocator.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

PACKAGES = ("torch", "triton", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "optimum-quanto",
            "safetensors", "numpy")
NOT_MEASURED = "not measured"


def versions() -> dict[str, str]:
    """Installed versions of the packages the engine's GPU paths depend on ("missing" when absent)."""
    out = {"python": platform.python_version()}
    for name in (*PACKAGES, "threedis-flux"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    torch = sys.modules.get("torch")  # the CUDA runtime torch was built for, once a part imported it
    if torch is not None:
        out["torch_cuda"] = str(torch.version.cuda)
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every complete row of a rows file (a line cut off by a killed writer is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def device_summary(rows_path: Path) -> dict[str, Any]:
    """The card as the environment part saw it (name, capability, memory, driver), for every later row."""
    for row in read_rows(rows_path):
        if row.get("what") in ("card", "environment") and isinstance(row.get("gpu"), dict):
            return {k: row["gpu"].get(k) for k in ("name", "capability", "memory_gb", "driver")}
    return {"name": None}


class Clock:
    """Seconds left before a deadline (time.time() based, so parent and child processes agree)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds


class Rows:
    """Appends one JSON object a line to the rows file, flushed and synced as each is measured."""

    def __init__(self, path: Path, part: str, device_type: str, run: str, device: dict[str, Any] | None = None) -> None:
        self.path, self.part, self.device_type, self.run = Path(path), part, device_type, run
        self.device = device if device is not None else device_summary(self.path)
        self._versions: dict[str, str] | None = None

    def emit(self, what: str, status: str = "ok", **fields: Any) -> dict[str, Any]:
        """Write one row. status: "ok" (measured and passing), "failed" (measured, a check fails),
        "error" (the measurement itself raised), NOT_MEASURED (with "why")."""
        if self._versions is None or "torch_cuda" not in self._versions:
            self._versions = versions()
        row = {"check": "gpu", "run": self.run, "part": self.part, "what": what, "status": status, **fields,
               "device_type": self.device_type, "device": self.device, "versions": self._versions,
               "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        line = json.dumps(row, sort_keys=True, default=str)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return row

    def not_measured(self, what: str, why: str, **fields: Any) -> dict[str, Any]:
        return self.emit(what, NOT_MEASURED, why=why, **fields)

    def mine(self) -> Iterator[dict[str, Any]]:
        """This part's rows of this run written so far."""
        return (r for r in read_rows(self.path) if r.get("part") == self.part and r.get("run") == self.run)


def float32_settings() -> dict[str, Any]:
    """PyTorch's float32 settings (TF32 in matmuls and convolutions): what "fp32" meant in a row. Imports torch:
    for the parts and bench scripts, never the orchestrator."""
    import warnings

    import torch

    with warnings.catch_warnings():  # newer torch prefers its fp32_precision settings: reading is enough here
        warnings.simplefilter("ignore")
        return {"cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                "float32_matmul_precision": torch.get_float32_matmul_precision()}


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, at most 400 characters: what a row keeps of an exception."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def is_fatal_cuda_error(exc: BaseException) -> bool:
    """A sticky CUDA error (illegal address, launch failure): the process's context is gone, stop the part."""
    text = str(exc)
    return any(s in text for s in ("illegal memory access", "unspecified launch failure", "device-side assert",
                                   "CUDA error: an illegal", "misaligned address"))
