"""Whether this machine surely has no CUDA device, answered without importing torch.

Why: importing torch takes seconds, tens of seconds on a busy machine. With this answer
`threedis plan` picks the profile "auto" would pick, and the CLI refuses a GPU profile or
`--device cuda` on a machine without CUDA, before any of that. Only a sure "no" counts: a
CPU-only torch build, macOS, no visible devices, or (Linux) no GPU driver device at all.
Anything else is "maybe", and the caller asks torch.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Callable, Mapping

__all__ = ["GPU_DEVICE_FILES", "cuda_surely_absent"]

# Device files a GPU that torch.cuda can use brings on Linux: NVIDIA's driver, Jetson's, WSL2's, AMD ROCm's.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/nvhost-ctrl",
                    "/dev/nvmap", "/dev/dxg", "/dev/kfd")


def _torch_version() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def cuda_surely_absent(torch_version: str | None = None, platform: str | None = None,
                       env: Mapping[str, str] | None = None, exists: Callable[[str], bool] = os.path.exists) -> bool:
    """True only when `torch.cuda.is_available()` is certain to be False here (the arguments are for tests)."""
    env = os.environ if env is None else env
    if env.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):  # set to hide every device
        return True
    version = torch_version if torch_version is not None else _torch_version()
    if version is None:  # no torch: nothing is sure; importing it will say more
        return False
    if version.partition("+")[2] == "cpu":  # the CPU-only wheels ("2.13.0+cpu")
        return True
    platform = platform if platform is not None else sys.platform
    if platform == "darwin":  # torch has no CUDA build for macOS
        return True
    if platform.startswith("linux"):
        return not any(exists(path) for path in GPU_DEVICE_FILES)
    return False
