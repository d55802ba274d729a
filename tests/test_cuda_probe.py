"""cuda_surely_absent: a sure "no CUDA here" without importing torch, and nothing else counts as sure."""

from __future__ import annotations

import pytest
import torch

from threedis.engine.cuda_probe import GPU_DEVICE_FILES, cuda_surely_absent


def _probe(version="2.13.0+cu128", platform="linux", env=None, files=()):
    return cuda_surely_absent(torch_version=version, platform=platform, env=env or {},
                              exists=lambda path: path in files)


@pytest.mark.parametrize("case, expected", [
    (dict(version="2.13.0+cpu"), True),  # the CPU-only wheel
    (dict(platform="darwin"), True),
    (dict(env={"CUDA_VISIBLE_DEVICES": ""}, files=("/dev/nvidiactl",)), True),
    (dict(env={"CUDA_VISIBLE_DEVICES": "-1"}, files=("/dev/nvidiactl",)), True),
    (dict(), True),  # a CUDA wheel on a Linux machine without any GPU driver device
    (dict(files=("/dev/nvidiactl",)), False),
    (dict(version="2.13.0", files=("/proc/driver/nvidia/version",)), False),
    (dict(version="2.13.0+rocm6.3", files=("/dev/kfd",)), False),  # ROCm answers torch.cuda too
    (dict(files=("/dev/dxg",)), False),  # WSL2
    (dict(platform="win32"), False),  # no way to be sure there: torch is asked
    (dict(env={"CUDA_VISIBLE_DEVICES": "0"}, files=("/dev/nvidia0",)), False),
])
def test_only_a_sure_no_counts(case, expected):
    assert _probe(**case) is expected


def test_every_gpu_device_file_means_maybe():
    assert all(_probe(files=(path,)) is False for path in GPU_DEVICE_FILES)


def test_agrees_with_torch_on_this_machine():
    if cuda_surely_absent():
        assert not torch.cuda.is_available()
