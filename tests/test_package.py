"""Packaging promises: import boundaries, no stray top-level modules, package data shipped."""

from __future__ import annotations

import importlib.resources
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_kernels_import_with_torch_and_triton_alone(tmp_path):
    code = (
        "import sys\n"
        "import threedis.kernels, threedis.kernels.rule, threedis.kernels.attention\n"
        "import threedis.kernels.sdpa_backend, threedis.kernels.flex_backend\n"
        "import threedis.kernels.triton_attention, threedis.kernels.block_table\n"
        "heavy = sorted(m for m in ('diffusers', 'transformers', 'PIL', 'accelerate', 'bitsandbytes')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"threedis.kernels pulled in: {proc.stdout.strip()}"


def test_no_top_level_engine_or_kernels_module(tmp_path):
    """Installed, threedis adds no top-level `engine` or `kernels` (the latter may be Hugging Face's)."""
    # Run from a folder outside the checkout so the repository root is not on sys.path.
    code = (
        "import importlib.util as u\n"
        "for name in ('engine', 'kernels', 'profiles', 'examples'):\n"
        "    spec = u.find_spec(name)\n"
        "    print(name, spec.origin if spec else None)\n"
    )
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    root = str(Path(__file__).resolve().parents[1])
    assert not any(root in line for line in proc.stdout.splitlines()), proc.stdout


def test_top_level_names_are_lazy(tmp_path):
    proc = _run("import sys, threedis; print('diffusers' in sys.modules); print(threedis.Layout.__name__)", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "Layout"]


@pytest.mark.parametrize(
    "package, pattern, at_least",
    [("threedis.profiles", ".toml", 5), ("threedis.examples", ".json", 3), ("threedis.engine.configs", ".json", 4)],
)
def test_package_data_is_shipped(package, pattern, at_least):
    names = [p.name for p in importlib.resources.files(package).iterdir() if p.name.endswith(pattern)]
    assert len(names) >= at_least, names
