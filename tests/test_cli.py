"""The `threedis` command line, called in-process through main([...]) (one subprocess smoke test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from threedis.engine.cli import EXIT_USER_ERROR, main
from threedis.engine.layout import example_path
from threedis.engine.outputs import read_metadata, render_kwargs_from_metadata
from threedis.engine.stages import Stage1Options

FAST = ["--steps", "1", "--chunk", "16", "--backend", "sdpa", "--device", "cpu"]
FAST_STAGE1 = ["--stage1-steps", "2", "--migc-steps", "1", "--stage1-size", "64"]


@pytest.fixture
def layout_file(tmp_path: Path) -> Path:
    data = {"prompt": "a garden at dawn", "width": 64, "height": 64, "instances": [
        {"prompt": "a red bird", "box": [0.1, 0.2, 0.5, 0.8]},
        {"prompt": "a blue jay", "box": [0.5, 0.25, 1.0, 0.75]}]}
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def bad_layout(tmp_path: Path) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"prompt": "x", "width": 64, "height": 64,
                                "instances": [{"prompt": "a", "box": [0.5, 0.5, 0.2, 0.9]}]}))
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.linear_gradient("L").resize((40, 30)).convert("RGB").save(path)
    return path


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("threedis: error: ")
    return lines[0]


# ------------------------------------------------------------------ user errors: one line, exit 2


def test_render_bad_layout_is_one_line(bad_layout, capsys):
    assert main(["render", str(bad_layout), "--model", "unused"]) == EXIT_USER_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "instances[0].box" in line


def test_render_missing_model_or_depth_file(layout_file, tiny_flux_dir, tmp_path, capsys):
    assert main(["render", str(layout_file)]) == EXIT_USER_ERROR
    assert "--model" in one_error_line(capsys.readouterr().err)
    assert main(["render", str(layout_file), "--model", str(tiny_flux_dir),
                 "--depth", str(tmp_path / "nope.png")]) == EXIT_USER_ERROR
    assert f"--depth {tmp_path / 'nope.png'}: not found" in one_error_line(capsys.readouterr().err)


def test_render_bad_layout_in_a_subprocess(bad_layout):
    proc = subprocess.run([sys.executable, "-m", "threedis.engine.cli", "render", str(bad_layout),
                           "--model", "unused"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_USER_ERROR
    one_error_line(proc.stderr)


def test_user_error_stays_one_line_after_heavy_imports(tmp_path):
    """Libraries imported mid-command (diffusers, bitsandbytes) must not add lines to a user error."""
    code = (
        "import sys\n"
        "from threedis.engine import cli\n"
        "def command(args):\n"
        "    import diffusers, bitsandbytes  # what loading a checkpoint imports\n"
        "    raise cli.UserError('the user made a mistake')\n"
        "cli.COMMANDS['profiles'] = command\n"
        "sys.exit(cli.main(['profiles']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    assert one_error_line(proc.stderr) == "threedis: error: the user made a mistake"


def test_validate_good_and_bad(bad_layout, capsys):
    good = example_path("two_birds")
    assert main(["validate", str(good)]) == 0
    assert "ok (512x512, 2 instances)" in capsys.readouterr().out
    assert main(["validate", str(good), str(bad_layout)]) == EXIT_USER_ERROR
    out = capsys.readouterr().out
    assert f"{bad_layout}: INVALID" in out and "ok" in out
    assert main(["validate", "--list"]) == 0
    assert "two_birds" in capsys.readouterr().out.split()


def test_validate_lists_every_problem(tmp_path, capsys):
    path = tmp_path / "many.json"
    path.write_text(json.dumps({"prompt": "", "width": 500, "height": 64, "extra": 1,
                                "instances": [{"prompt": "a", "box": [0.5, 0.5, 0.2, 0.9]}]}))
    assert main(["validate", str(path)]) == EXIT_USER_ERROR
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"{path}: INVALID (4 problems):"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["extra", "prompt", "width", "instances[0].box"]


def test_make_tiny_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["make-tiny", str(tmp_path)]) == EXIT_USER_ERROR
    assert "not empty" in one_error_line(capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------ depth from a photo


def test_depth_writes_once_and_never_overwrites_silently(photo, tmp_path, capsys):
    from threedis.engine.tiny.depth import tiny_depth_anything_path

    model = str(tiny_depth_anything_path())
    out = tmp_path / "maps" / "depth.png"
    assert main(["depth", str(photo), "--out", str(out), "--model", model, "--device", "cpu"]) == 0
    with Image.open(out) as img:
        assert img.mode == "L" and img.size == (40, 30)
    before = out.read_bytes()
    capsys.readouterr()  # drop the first run's output (model-loading progress)
    assert main(["depth", str(photo), "--out", str(out), "--model", model, "--size", "64x48"]) == EXIT_USER_ERROR
    assert "already exists" in one_error_line(capsys.readouterr().err)
    assert out.read_bytes() == before
    assert main(["depth", str(photo), "--out", str(out), "--model", model, "--size", "64x48", "--overwrite"]) == 0
    with Image.open(out) as img:
        assert img.size == (64, 48)
    capsys.readouterr()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".threedis-")]
    assert main(["depth", str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "d.png"),
                 "--model", model]) == EXIT_USER_ERROR
    assert "missing.jpg: not found" in one_error_line(capsys.readouterr().err)


def test_depth_error_names_a_flag_that_depth_takes(photo, tmp_path, capsys):
    """The missing-model hint says `--depth-model FOLDER`; `threedis depth` takes that flag (and --model)."""
    import re

    from threedis.engine.tiny.depth import tiny_depth_anything_path

    assert main(["depth", str(photo), "--out", str(tmp_path / "d.png"),
                 "--model", str(tmp_path / "no-model")]) == EXIT_USER_ERROR
    line = one_error_line(capsys.readouterr().err)
    flag = re.search(r"then pass `(--[\w-]+) ", line).group(1)
    assert flag == "--depth-model", line
    assert main(["depth", str(photo), "--out", str(tmp_path / "d.png"), flag, str(tiny_depth_anything_path()),
                 "--device", "cpu"]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------ rendering end to end


def test_render_without_depth_runs_stage1_and_sam(layout_file, tiny_flux_dir, tmp_path, capsys):
    from threedis.engine.tiny.ldm3d import tiny_ldm3d_path
    from threedis.engine.tiny.sam2 import tiny_sam2_path

    out = tmp_path / "out"
    code = main(["render", str(layout_file), "--model", str(tiny_flux_dir), "--out", str(out),
                 "--stage1", str(tiny_ldm3d_path()), "--sam", str(tiny_sam2_path()), *FAST, *FAST_STAGE1,
                 "--refine-steps", "1"])
    assert code == 0, capsys.readouterr().err
    assert {"image.png", "depth.png", "stage1-rgb.png", "layout.png", "report.json"} <= {p.name for p in out.iterdir()}
    meta = read_metadata(out / "image.png")
    assert meta["depth"]["source"] == "stage1" and meta["depth"]["model"] == str(tiny_ldm3d_path())
    assert meta["depth"]["steps"] == 2 and meta["sam"]["ran"] is True
    assert meta["depth"]["refine_steps"] == 1  # the shader's step count is recorded and read back
    assert render_kwargs_from_metadata(meta)["stage1"] == Stage1Options(steps=2, migc_steps=1, size=64, seed=0,
                                                                        refine_steps=1)
    for i, source in enumerate(meta["masks"]):
        assert (out / f"mask-{i}.png").exists() == (source == "sam")
    # the tiny SAM2's masks are random shapes: the output says so, on the terminal and in the image
    assert "threedis: warning: SAM2 is a tiny random-weight checkpoint" in capsys.readouterr().err
    assert any("tiny random-weight" in w for w in meta["warnings"])
    stages = [s["name"] for s in json.loads((out / "report.json").read_text())["stages"]]
    assert {"stage1", "sam", "encode", "step", "decode"} <= set(stages)


def test_stage1_model_from_the_environment_and_tiny_defaults(layout_file, tiny_flux_dir, tmp_path, monkeypatch,
                                                              capsys):
    """On tiny checkpoints, steps and stage 1's size and steps are the demo's unless given (not 20 / 512 px x 30)."""
    from threedis.engine import tiny_rules
    from threedis.engine.tiny.ldm3d import tiny_ldm3d_path

    monkeypatch.setenv("THREEDIS_STAGE1", str(tiny_ldm3d_path()))
    out = tmp_path / "env"
    assert main(["render", str(layout_file), "--model", str(tiny_flux_dir), "--out", str(out),
                 "--chunk", "16", "--backend", "sdpa", "--device", "cpu"]) == 0, capsys.readouterr().err
    meta = read_metadata(out / "image.png")
    assert meta["depth"]["model"] == str(tiny_ldm3d_path()) and meta["sam"]["ran"] is False
    assert meta["steps"] == tiny_rules.STEPS == 4
    assert (meta["depth"]["steps"], meta["depth"]["migc_steps"], meta["depth"]["size"]) == (4, 2, [64, 64])


def test_render_depth_from_photo(layout_file, tiny_flux_dir, photo, tmp_path, capsys):
    from threedis.engine.tiny.depth import tiny_depth_anything_path

    out = tmp_path / "photo-out"
    assert main(["render", str(layout_file), "--model", str(tiny_flux_dir), "--out", str(out),
                 "--depth-from-photo", str(photo), "--depth-model", str(tiny_depth_anything_path()), *FAST]) == 0
    meta = read_metadata(out / "image.png")
    assert meta["depth"]["source"] == "photo" and meta["depth"]["photo"] == str(photo)
    assert not (out / "stage1-rgb.png").exists()
    # a 40x30 photo on a 64x64 layout: its depth map is stretched, as a --depth map of that shape would be
    warned = "the photo is 40x30 but the layout is 64x64: it is stretched to the layout's aspect ratio"
    assert f"threedis: warning: {warned}" in capsys.readouterr().err
    assert any(w.startswith(warned) for w in meta["warnings"])
    with Image.open(out / "depth.png") as depth:
        assert depth.size == (64, 64)
        assert np.asarray(depth.convert("L")).std() > 0


def test_demo_runs_every_stage_on_tiny_checkpoints(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"image.png", "depth.png", "stage1-rgb.png", "layout.png", "report.json", "memory.png",
            "regions.png", "attention.png"} <= names
    meta = read_metadata(out / "image.png")
    # no SAM2 unless asked: a random-weight SAM2 draws blobs that contradict layout.png
    assert meta["depth"]["source"] == "stage1" and meta["sam"]["ran"] is False
    assert not list(out.glob("mask-*.png"))
    with Image.open(out / "image.png") as image:
        assert max(image.size) <= 256
    printed = capsys.readouterr().out
    assert "tiny random-weight" in printed and "stage1" in printed and "SAM2" not in printed
    assert "profile cpu (auto: " in printed and "attention backend " in printed  # the choices, said up front
    assert any(line.split()[:2] == ["save", "1"] for line in printed.splitlines())  # the terminal table has it
    report = json.loads((out / "report.json").read_text())
    steps = [s for s in report["stages"] if s["name"] == "step" and s["info"].get("masked")]
    assert steps and all(0 < s["info"]["tile_fraction"] <= 1 and 0 < s["info"]["density"] <= 1 for s in steps)
    assert report["stages"][-1]["name"] == "save"


def test_demo_runs_the_tiny_sam2_only_when_asked_and_says_its_masks_are_random(tmp_path, capsys):
    out = tmp_path / "demo-sam"
    assert main(["demo", "--sam", "--out", str(out), "--steps", "1", "--stage1-steps", "1", "--migc-steps", "1",
                 "--chunk", "16"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "SAM2: tiny random-weight checkpoint" in captured.out and "random shapes" in captured.out
    assert "threedis: warning: SAM2 is a tiny random-weight checkpoint" in captured.err
    assert read_metadata(out / "image.png")["sam"]["ran"] is True


def test_output_piped_into_a_reader_that_leaves_is_not_a_traceback(tmp_path, monkeypatch):
    """`threedis profiles --show 12gb | head -1`: the closed pipe ends the command quietly, exit 0."""
    sink = open(tmp_path / "sink", "w")

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return sink.fileno()

    saved = os.dup(1)
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        assert main(["profiles", "--show", "12gb"]) == 0
    finally:
        os.dup2(saved, 1)  # main pointed fd 1 at /dev/null for the interpreter's last flush; pytest needs it back
        os.close(saved)
        sink.close()
