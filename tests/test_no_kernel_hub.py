"""The engine imports bitsandbytes (through diffusers -> peft) without its kernel-hub lookup and its warning line.

A fresh interpreter: bitsandbytes runs the lookup once per process, when it is first imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("kernels")

PROBE = """
import json, sys
import kernels
calls = []

def recording_get_kernel(repo_id, *args, **kwargs):  # stands in for the hub: records, then fails as offline
    calls.append(repo_id)
    raise RuntimeError("no kernel hub in this test")

kernels.get_kernel = recording_get_kernel
import threedis.engine  # what every engine module imports first
import bitsandbytes.functional  # as peft does when diffusers loads any model class
print(json.dumps({"calls": calls, "imported": "bitsandbytes.backends.cpu.ops" in sys.modules,
                  "lookup_on_this_cpu": bool(bitsandbytes.functional.has_avx512bf16()),
                  "restored": kernels.get_kernel is recording_get_kernel}))
"""


def test_importing_the_engine_models_makes_no_kernel_hub_lookup(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["imported"], "bitsandbytes has no CPU ops module any more: nothing left to check"
    if not result["lookup_on_this_cpu"]:
        pytest.skip("bitsandbytes looks the kernel up only on CPUs with AVX512-BF16")
    assert result["calls"] == [], "bitsandbytes asked the kernel hub while the engine imported it"
    assert "gemm_4bit_forward" not in done.stderr, done.stderr
    assert result["restored"], "kernels.get_kernel must be the caller's again afterwards"
