"""Issue 16, section 4: the rest of the bad-input tour, each one line (exit 2) or a refusal.

Files: a folder, a named pipe or a device given as a file is said to be that, never
"not found", and never opened (a pipe would block). Folders: a file in the way, no
permission, a file system that takes nothing, a user without a home: one line naming
the obstacle. Unwritable folders are real: chmod for a normal user, `chattr +i` for
root (whom chmod does not stop); where neither works the test says why it skips.
"""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from threedis.engine import checks, paths
from threedis.engine.cli import EXIT_USER_ERROR, main
from threedis.engine.errors import NonFiniteError, UserError
from threedis.engine.layout import Instance, Layout


def one_line(stream: str) -> str:
    lines = stream.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stream, stream
    assert lines[0].startswith("threedis: error: "), stream
    return lines[0]


def _layout_file(tmp_path: Path) -> Path:
    path = tmp_path / "layout.json"
    Layout("a garden", 64, 64, (Instance("a bird", (0.1, 0.2, 0.5, 0.8)),)).save(path)
    return path


# ------------------------------------------------------------------ files that are not files


@pytest.mark.parametrize("kind, words", [("folder", "is a folder, not a file"), ("fifo", "is a named pipe (FIFO)"),
                                         ("device", "is a device, not a file"), ("missing", ": not found"),
                                         ("under a file", "not found (a folder on its way is a file)")])
def test_every_reader_says_what_a_path_is(kind, words, tmp_path, capsys):
    layout = _layout_file(tmp_path)
    model = tmp_path / "model"  # a folder: the model checks made before the file checks pass
    model.mkdir()
    target = {"folder": tmp_path, "device": Path("/dev/zero"), "missing": tmp_path / "nope.png",
              "under a file": layout / "x.png", "fifo": tmp_path / "pipe"}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    commands = [
        ["validate", str(target)],
        ["render", str(layout), "--model", "unused", "--depth", str(target)],
        ["render", str(layout), "--model", "unused", "--depth-from-photo", str(target)],
        ["depth", str(target), "--out", str(tmp_path / "d.png"), "--model", str(model)],
        ["profiles", "--show", str(target)],
        ["render", "--from", str(target)],
    ]
    for argv in commands:
        code = main(argv)
        out, err = capsys.readouterr()
        said = out.strip() if argv[0] == "validate" else one_line(err)  # validate lists each file's problem
        if argv[0] == "profiles" and kind == "missing":  # a missing file may be a mistyped built-in name
            words_here = "is neither a built-in"
        else:
            words_here = words
        assert code == EXIT_USER_ERROR and words_here in said, (argv, said)
        if kind != "missing":
            assert "not found:" not in said and "file not found" not in said, said
    for call in (lambda: paths.input_file(target, "LoRA file"), lambda: Layout.from_dict(
            {"prompt": "a", "width": 64, "height": 64, "instances": [{"prompt": "b", "box": [0, 0, 1, 1],
                                                                       "mask": str(target)}]})):
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_file_where_a_folder_is_needed_names_the_file(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    layout = _layout_file(tmp_path)
    for out in (blocker, blocker / "sub"):
        assert main(["render", str(layout), "--model", str(tmp_path), "--depth", str(layout), "--out", str(out)]) == 2
        said = one_line(capsys.readouterr().err)
        assert f"{blocker} is a file, not a folder" in said and "Errno" not in said, said
    with pytest.raises(UserError, match=f"{blocker} is a file, not a folder"):
        paths.make_folder(blocker / "a" / "b", "cache folder", "set $THREEDIS_CACHE")


# ------------------------------------------------------------------ profiles


@pytest.mark.parametrize("content, words", [
    (bytes(range(256)) * 4, "is not UTF-8 text"),
    (b"a = " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"x" * ((1 << 20) + 1), "larger than"),
], ids=["binary", "100k-deep", "huge"])
def test_profile_files_that_are_not_profiles(content, words, tmp_path, capsys):
    path = tmp_path / "p.toml"
    path.write_bytes(content)
    assert main(["profiles", "--show", str(path)]) == EXIT_USER_ERROR
    assert words in one_line(capsys.readouterr().err)


# ------------------------------------------------------------------ make-tiny


def test_make_tiny_seed_range_is_checked_before_writing(tmp_path, capsys):
    target = tmp_path / "t"
    assert main(["make-tiny", "sam2", str(target), "--seed", str(2**70)]) == EXIT_USER_ERROR
    assert "outside 0..18446744073709551615" in one_line(capsys.readouterr().err)
    assert not target.exists()
    assert main(["make-tiny", "sam2", str(target), "--seed", str(2**64 - 1)]) == 0  # the top of the range works
    from threedis.engine.tiny.store import seeded

    seeded(2**64 - 1, 15)  # the writers' per-part seeds stay in torch's range (flux and ldm3d use them)


def test_make_tiny_into_a_folder_it_cannot_write(unwritable, capsys):
    for target in (unwritable, unwritable / "sub"):
        assert main(["make-tiny", "sam2", str(target)]) == EXIT_USER_ERROR
        said = one_line(capsys.readouterr().err)
        assert f"no permission to write in {unwritable}" in said, said
    assert list(unwritable.iterdir()) == []


def test_make_tiny_home_folder_of_a_user_without_one(tmp_path, monkeypatch, capsys):
    import pwd

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("THREEDIS_CACHE", raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert main(["make-tiny", "sam2", "~/tiny"]) == EXIT_USER_ERROR
    assert "has no home folder" in one_line(capsys.readouterr().err)
    with pytest.raises(UserError, match=r"no home folder.*set \$THREEDIS_CACHE"):
        paths.cache_root()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc: a folder that takes nothing")
def test_make_tiny_suggests_only_a_folder_this_user_could_make(tmp_path, monkeypatch, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    monkeypatch.setenv("THREEDIS_CACHE", "/proc/self")  # a cache (or a home) nobody can write in
    assert main(["make-tiny", "sam2", str(busy)]) == EXIT_USER_ERROR
    said = one_line(capsys.readouterr().err)
    assert "is not empty" in said and "e.g." not in said, said
    monkeypatch.setenv("THREEDIS_CACHE", str(tmp_path / "cache"))
    assert main(["make-tiny", "sam2", str(busy)]) == EXIT_USER_ERROR
    assert f"e.g. {tmp_path / 'cache' / 'make-tiny' / 'sam2'}" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "cache").exists(), "finding out made nothing"


def test_make_tiny_that_fails_half_way_leaves_the_folder_as_found(tmp_path, monkeypatch):
    from threedis.engine import tiny

    def broken(path, seed=0):
        (Path(path) / "half").mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "half"))

    monkeypatch.setitem(tiny.KINDS, "sam2", tiny.KINDS["sam2"].__class__(
        "SAM2", broken, tiny.KINDS["sam2"].cached, tiny.KINDS["sam2"].stands_in_for, "--sam"))
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for target in (new, empty):
        with pytest.raises(UserError, match="No space left on device"):
            tiny.write_tiny("sam2", target)
    assert not new.exists() and list(empty.iterdir()) == []  # a second try is not refused as "not empty"


# ------------------------------------------------------------------ the cache folder


def test_demo_with_a_cache_folder_that_takes_nothing(tmp_path, monkeypatch, capsys):
    for cache, words in ((Path("/proc/self"), "/proc/self does not take new files or folders"),
                         (tmp_path / "file", "is a file, not a folder")):
        if cache.name == "file":
            cache.write_text("x")
        monkeypatch.setenv("THREEDIS_CACHE", str(cache))
        assert main(["demo", "--out", str(tmp_path / "out")]) == EXIT_USER_ERROR
        said = one_line(capsys.readouterr().err)
        assert words in said and "$THREEDIS_CACHE" in said, said


def test_demo_with_an_unwritable_cache_folder(unwritable, monkeypatch, capsys):
    for cache in (unwritable, unwritable / "cache"):
        monkeypatch.setenv("THREEDIS_CACHE", str(cache))
        assert main(["demo", "--out", str(unwritable.parent / "out")]) == EXIT_USER_ERROR
        assert f"no permission to write in {unwritable}" in one_line(capsys.readouterr().err)


def test_quanto_builds_go_to_the_cache_when_its_folder_is_read_only(unwritable, tmp_path):
    pytest.importorskip("optimum.quanto")
    from optimum.quanto.library.extensions.extension import Extension

    from threedis.engine.quanto_build import place_quanto_builds

    locked = Extension("quanto_test", root_dir=str(unwritable), sources=["unpack.cpp"])
    free = Extension("quanto_free", root_dir=str(tmp_path / "pkg"), sources=["unpack.cpp"])
    moved = place_quanto_builds([locked, free], cache=tmp_path / "cache")
    assert moved == {"quanto_test": tmp_path / "cache" / "quanto_test"}
    assert locked.build_directory == str(tmp_path / "cache" / "quanto_test")  # where quanto now compiles
    assert free.build_directory == str(tmp_path / "pkg" / "build")  # a writable package folder is kept
    stuck = Extension("quanto_stuck", root_dir=str(unwritable), sources=["unpack.cpp"])
    with pytest.raises(UserError, match="neither its build folder"):
        place_quanto_builds([stuck], cache=unwritable / "cache")


# ------------------------------------------------------------------ exit 0 with a wrong result


def test_depth_of_a_half_nan_float_photo_is_refused(tmp_path, capsys):
    values = np.random.default_rng(0).random((48, 64), dtype=np.float32)
    values[:, :32] = np.nan
    photo = tmp_path / "photo.tif"
    Image.fromarray(values, mode="F").save(photo)
    assert main(["depth", str(photo), "--out", str(tmp_path / "d.png"), "--model", str(tmp_path)]) == EXIT_USER_ERROR
    assert "NaN or infinite values in 1536 of its 3072 pixels (50%)" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "d.png").exists()


def test_wide_photos_keep_their_range():
    from threedis.engine.depth_estimation import normalize_depth, open_image

    rng = np.random.default_rng(1)
    eight = rng.integers(0, 256, (6, 7)).astype(np.uint8)
    want = np.repeat(eight[..., None], 3, axis=2)
    as_float = Image.fromarray(eight.astype(np.float32) / 255, mode="F")  # a float photo in 0..1: not black
    as_16 = Image.fromarray(eight.astype(np.uint16) * 257)  # a 16-bit photo: not white
    for image in (as_float, as_16):
        assert np.array_equal(np.asarray(open_image(image)), want), image.mode
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        normalize_depth(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))


def test_plan_refuses_the_chunk_a_render_refuses(tmp_path, capsys):
    layout = _layout_file(tmp_path)
    assert main(["plan", str(layout), "--chunk", str(10**9)]) == EXIT_USER_ERROR
    assert f"1..{checks.CHUNK_MAX}" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("scale", [1e30, float("nan"), float("inf"), -101.0, True])
def test_one_lora_scale_range_everywhere(scale, tmp_path):
    from threedis.engine.cli_args import lora_arg, loras
    from threedis.engine.lora import load_lora
    from threedis.engine.metadata import MetadataError, parse_metadata

    with pytest.raises(UserError, match="scale"):
        load_lora(None, tmp_path / "missing.safetensors", scale=scale)  # refused before the file or model
    if not isinstance(scale, bool):  # --lora PATH:SCALE in every command, and the old --lora-scale
        with pytest.raises(argparse.ArgumentTypeError, match="LoRA scale"):
            lora_arg(f"{tmp_path / 'a.safetensors'}:{scale}")
        with pytest.raises(UserError, match="--lora-scale"):
            loras([(str(tmp_path / "a.safetensors"), None)], old_scale=scale)
    lora = {"path": "a.safetensors", "scale": scale, "name": "lora0"}
    with pytest.raises(MetadataError, match="loras"):
        parse_metadata({"layout": {}, "seed": 0, "steps": 1, "guidance": 1.0, "schedule": {"steps": 1}, "chunk": 8,
                        "append_instances": True, "permute_tokens": False, "loras": [lora]})


def test_the_top_of_the_lora_scale_range_renders_again():
    from threedis.engine.metadata import parse_metadata

    top = checks.check_lora_scale(checks.LORA_SCALE_MAX)
    meta = parse_metadata({"layout": {}, "seed": 0, "steps": 1, "guidance": 1.0, "schedule": {"steps": 1},
                           "chunk": 8, "append_instances": True, "permute_tokens": False,
                           "loras": [{"path": "a.safetensors", "scale": top, "name": "lora0"}]})
    assert meta["loras"][0]["scale"] == top


def test_depth_size_errors_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["depth", str(tmp_path / "p.png"), "--size", "5x5"])
    err = capsys.readouterr().err
    assert "argument --size: the size must be a multiple of 8" in err and "stage1_size" not in err
