"""What the first commands import: `validate` and `--help` no torch, `plan` no diffusers/transformers.

Checked through sys.modules in a fresh interpreter (what a user's shell starts), not by timing;
bench/cli_startup.py measures the times.
"""

from __future__ import annotations

import json
import subprocess
import sys

from threedis.engine.layout import example_path

PROBE = """
import contextlib, io, json, sys
from threedis.engine.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:  # --help
        code = exc.code
heavy = ("torch", "diffusers", "transformers", "triton", "PIL", "numpy")
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules], "out": out.getvalue()}))
"""


def _run(*args: str, cwd) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_validate_and_help_import_no_torch(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": "", "width": 100, "height": 64}')
    good = _run("validate", str(example_path("two_birds")), cwd=tmp_path)
    assert good["code"] == 0 and "ok (512x512, 2 instances)" in good["out"] and good["loaded"] == []
    invalid = _run("validate", str(bad), cwd=tmp_path)
    assert invalid["code"] == 2 and "INVALID" in invalid["out"] and invalid["loaded"] == []
    helped = _run("--help", cwd=tmp_path)
    assert helped["code"] == 0 and "validate" in helped["out"] and helped["loaded"] == []


def test_plan_reads_stored_counts_without_diffusers_or_transformers(tmp_path):
    result = _run("plan", str(example_path("two_birds")), "--json", "--stage1", "--sam", cwd=tmp_path)
    assert result["code"] == 0
    assert not {"diffusers", "transformers", "torch"} & set(result["loaded"]), result["loaded"]
    assert json.loads(result["out"])["models"]["transformer"]["params"] == 11_901_604_928
