"""What the first commands import: `validate` and `--help` no torch, `plan` no diffusers/transformers.

Checked through sys.modules in a fresh interpreter (what a user's shell starts), not by timing;
bench/cli_startup.py measures the times.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    result = _run("plan", str(example_path("two_birds")), "--json", "--stage1", "--sam", "--profile", "12gb",
                  cwd=tmp_path)
    assert result["code"] in (0, 3)  # 3: the plan exceeds this machine's RAM
    assert not {"diffusers", "transformers", "torch"} & set(result["loaded"]), result["loaded"]
    assert json.loads(result["out"])["models"]["transformer"]["params"] == 11_901_604_928


def test_plan_picks_auto_without_torch_where_there_is_surely_no_cuda(tmp_path):
    from threedis.engine.cuda_probe import cuda_surely_absent

    if not cuda_surely_absent():
        pytest.skip("CUDA may be here: `auto` measures free VRAM with torch")
    result = _run("plan", str(example_path("two_birds")), "--json", cwd=tmp_path)
    assert result["code"] in (0, 3) and result["loaded"] == [], result["loaded"]
    assert json.loads(result["out"])["profile_origin"] == "auto: picked cpu: no CUDA device"


REFUSALS = """
import contextlib, io, json, sys
from threedis.engine.cli import main
codes, errors = [], []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        codes.append(main(argv))
    errors.append(err.getvalue())
print(json.dumps({"codes": codes, "errors": errors, "torch": "torch" in sys.modules}))
"""


def test_refusals_that_need_no_model_come_before_torch(tmp_path):
    """A GPU profile on a CPU, model folders or files that are not there: refused without importing torch."""
    layout = str(example_path("two_birds"))
    empty = tmp_path / "flux"  # exists: the model check passes, the next check refuses
    empty.mkdir()
    missing = str(tmp_path / "missing")
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"not read")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"layout": "not read before the refusal"}\n')
    batch = ["batch", str(jobs), "--out", str(tmp_path / "runs" / "a"), "--model", str(empty)]
    blocked = str(photo / "out")  # a folder inside a file cannot be made
    cases = {
        "profile '12gb' puts": ["render", layout, "--model", str(empty), "--profile", "12gb", "--device", "cpu"],
        "--device cuda:99": ["render", layout, "--model", str(empty), "--device", "cuda:99"],
        "stage-1 base model folder not found": ["render", layout, "--model", str(empty), "--stage1", missing],
        "model folder not found": ["render", layout, "--model", missing],
        "SAM2 model folder not found": ["render", layout, "--model", str(empty), "--sam", missing],
        "depth model folder not found": ["render", layout, "--model", str(empty), "--depth-from-photo", str(photo),
                                         "--depth-model", missing],
        f"--depth {missing}: not found": ["render", layout, "--model", str(empty), "--depth", missing],
        f"LoRA file {missing}: not found": ["render", layout, "--model", str(empty), "--lora", missing + ":0.5"],
        "steps must be": ["render", layout, "--model", str(empty), "--steps", "0"],
        "is neither a built-in": ["demo", "--profile", "nope.toml"],  # the demo: before its tiny checkpoints
        "depth model folder not found: ": ["depth", str(photo), "--depth-model", missing, "--out",
                                           str(tmp_path / "d.png")],
        f"the output folder: {photo} is a file": ["render", layout, "--model", str(empty), "--out", blocked],
        f"output folder: {photo} is a file, not": ["demo", "--out", blocked],
        # batch: the same checks before torch and before its output folder is made
        "profile '12gb' puts transformer": [*batch, "--profile", "12gb", "--device", "cpu"],
        "--seeds: range '3-1' runs backwards": [*batch, "--seeds", "3-1"],
        "--steps must be": [*batch, "--steps", "0"],
        f"error: LoRA file {missing}": [*batch, "--lora", missing],
        "model folder not found: ": [*batch, "--model", missing],
        f"job file {missing}: not found": ["batch", missing, "--out", str(tmp_path / "runs" / "b")],
        f"COCO-MIG file {missing}: not found": ["batch", "--from-mig", missing, "--out", str(tmp_path / "runs")],
        f"create the output folder: {photo} is a file": [*batch[:3], blocked],
    }
    done = subprocess.run([sys.executable, "-c", REFUSALS, json.dumps(list(cases.values()))], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    for (expected, argv), code, err in zip(cases.items(), result["codes"], result["errors"]):
        assert code == 2 and expected in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "runs").exists(), "a refused batch made its output folder"
    from threedis.engine.cuda_probe import cuda_surely_absent

    if cuda_surely_absent():  # else `--device cuda:3` needs torch to be refused, rightly
        assert result["torch"] is False, "a refusal imported torch"
