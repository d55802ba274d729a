"""A render's files appear together or not at all; interrupts and full or read-only folders leave nothing
partial; `render --from` reads its metadata as untrusted input (issue: hardening, items 2, 4 and 5)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from threedis.engine import outputs
from threedis.engine.api import Engine, RenderOptions
from threedis.engine.cli import EXIT_USER_ERROR, main
from threedis.engine.errors import UserError
from threedis.engine.interrupts import Terminated, interrupt_message, terminate_like_interrupt, uninterruptible
from threedis.engine.layout import Instance, Layout
from threedis.engine.metadata import MetadataError, parse_metadata
from threedis.engine.outputs import METADATA_KEY, check_output_folder, remove_stale_temp

FAST = ["--backend", "sdpa", "--device", "cpu"]


def scene(mask: str | None = None) -> Layout:
    return Layout("a garden at dawn", 64, 64, (Instance("a red bird", (0.1, 0.2, 0.5, 0.8), mask=mask),
                                               Instance("a blue jay", (0.5, 0.1, 0.9, 0.7))))


@pytest.fixture(scope="module")
def engine(tiny_flux_dir, tmp_path_factory) -> Engine:
    return Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa",
                                  cache_dir=tmp_path_factory.mktemp("hardening-cache"))


@pytest.fixture(scope="module")
def result(engine, depth_image_64_module):
    return engine.render(scene(), depth=depth_image_64_module, steps=1, options=RenderOptions(chunk=8))


@pytest.fixture(scope="module")
def depth_image_64_module():
    return Image.linear_gradient("L").resize((64, 64)).convert("RGB")


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ whole sets, interrupts


def test_interrupt_while_writing_aside_leaves_nothing(result, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("threedis.engine.pictures.save_rule_pictures", broken)
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path)
    assert names(tmp_path) == set()  # no final names, no temporary folder


def test_signal_during_the_move_in_waits_until_the_set_is_whole(result, tmp_path, monkeypatch, ctrl_c_raises):
    real = outputs._place_exclusive
    calls: list[Path] = []

    def place(src: Path, dst: Path) -> None:
        calls.append(dst)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C half-way through placing the files
        real(src, dst)

    monkeypatch.setattr(outputs, "_place_exclusive", place)
    with pytest.raises(KeyboardInterrupt) as caught:
        result.save(tmp_path)
    assert len(calls) > 3 and all(path.is_file() for path in calls)  # every file of the set is in place
    assert not [n for n in names(tmp_path) if n.startswith(".threedis-")]
    said = interrupt_message(caught.value)  # what the command prints: the set is whole, and where
    assert said.startswith("threedis: interrupted once the outputs were complete")
    assert all(str(path) in said for path in calls)


def test_ctrl_c_during_the_move_in_prints_the_whole_set_and_exits_130(tiny_flux_dir, tmp_path, monkeypatch, capsys):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # set here: the test relies on it
    real = outputs._place_exclusive
    calls: list[Path] = []

    def place(src: Path, dst: Path) -> None:
        calls.append(dst)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        real(src, dst)

    monkeypatch.setattr(outputs, "_place_exclusive", place)
    layout = tmp_path / "layout.json"
    scene().save(layout)
    depth = tmp_path / "depth-in.png"
    Image.linear_gradient("L").resize((64, 64)).save(depth)
    out = tmp_path / "out"
    try:
        code = main(["render", str(layout), "--model", str(tiny_flux_dir), "--depth", str(depth), "--out", str(out),
                     "--steps", "1", "--chunk", "8", *FAST])
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert code == 130, err
    assert "once the outputs were complete" in err and "nothing partial" not in err
    assert f"image        {out / 'image.png'}" in err and all(str(path) in err for path in calls)
    assert all(path.is_file() for path in calls)


def test_a_failure_while_moving_in_takes_the_set_back(result, tmp_path, monkeypatch):
    real = outputs._place_exclusive
    calls: list[Path] = []

    def place(src: Path, dst: Path) -> None:
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(outputs, "_place_exclusive", place)
    with pytest.raises(UserError, match="No space left"):
        result.save(tmp_path)
    assert names(tmp_path) == set()


def test_a_full_disk_while_writing_is_one_error_and_leaves_nothing(result, tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(UserError, match="cannot write the outputs.*No space left"):
        result.save(tmp_path)
    assert names(tmp_path) == set()


def test_sigterm_is_handled_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), terminate_like_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode; this never finishes
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_held_signals_are_delivered_after_the_block():
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with uninterruptible():
            signal.raise_signal(signal.SIGINT)
            assert seen == []  # held
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_stale_temp_folders_of_dead_writers_are_removed(result, tmp_path):
    dead = tmp_path / f".threedis-{dead_pid()}-abcd"
    dead.mkdir()
    (dead / "image.png").write_bytes(b"partial")
    live = tmp_path / f".threedis-{os.getpid()}-live"  # a writer that is still running: left alone
    live.mkdir()
    old = tmp_path / ".threedis-oldstyle"
    old.mkdir()
    os.utime(old, (time.time() - 2 * outputs.STALE_AFTER_S,) * 2)
    result.save(tmp_path)
    left = names(tmp_path)
    assert dead.name not in left and old.name not in left and live.name in left
    assert remove_stale_temp(tmp_path) == []


def test_sigterm_during_a_cli_render_exits_cleanly(tiny_flux_dir, tmp_path, depth_image_64_module):
    """A real process: SIGTERM mid-render -> one message, exit 143, no outputs and no temp folder."""
    layout = tmp_path / "layout.json"
    scene().save(layout)
    depth = tmp_path / "depth.png"
    depth_image_64_module.save(depth)
    out = tmp_path / "out"
    code = ("import sys, time, threedis.engine.denoise as d\n"
            "real = d.render_image\n"
            "def slow(*a, **k):\n"
            "    print('RENDERING', file=sys.stderr, flush=True); time.sleep(60); return real(*a, **k)\n"
            "d.render_image = slow\n"
            "import threedis.engine.api as api; api.render_image = slow\n"
            "from threedis.engine.cli import main; sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "render", str(layout), "--model", str(tiny_flux_dir),
                             "--depth", str(depth), "--out", str(out), "--steps", "1", *FAST],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:
            if "RENDERING" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "threedis: terminated" in err and "Traceback" not in err
    assert not out.exists() or names(out) == set()  # no image, no half set, no temp folder


# ------------------------------------------------------------------ the output folder, checked first


def test_output_folder_problems_are_found_before_any_work(tmp_path, monkeypatch, capsys, tiny_flux_dir):
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_output_folder(target)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match="MB free"):
        check_output_folder(tmp_path / "new")
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)  # root ignores chmod: simulate read-only
    with pytest.raises(UserError, match=r"cannot write to the output folder .*/ro: no permission to write in .*/ro;"):
        check_output_folder(tmp_path / "ro")
    monkeypatch.setattr(Engine, "from_pretrained", lambda *a, **k: pytest.fail("the engine was loaded"))
    layout = tmp_path / "layout.json"
    scene().save(layout)
    assert main(["render", str(layout), "--model", str(tiny_flux_dir), "--depth", str(layout), "--out",
                 str(tmp_path / "ro"), *FAST]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to the output folder" in err


# ------------------------------------------------------------------ render --from: metadata is user input


def write_with_meta(source: Path, target: Path, change) -> Path:
    """Copy a threedis PNG with its metadata changed by change(meta) (or replaced by its return value)."""
    with Image.open(source) as image:
        meta = json.loads(image.text[METADATA_KEY])
        pixels = image.copy()
    replaced = change(meta)
    text = replaced if isinstance(replaced, str) else json.dumps(replaced if isinstance(replaced, list) else meta)
    info = PngInfo()
    info.add_itxt(METADATA_KEY, text)
    pixels.save(target, pnginfo=info)
    return target


@pytest.fixture
def saved(result, tmp_path) -> Path:
    return result.save(tmp_path / "saved")["image"]


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(steps="20"), "steps must be a whole number"),
    (lambda m: m.update(steps=10**9), "steps must be a whole number in 1..1000"),
    (lambda m: m.update(guidance=float("inf")), "guidance must be a number"),
    (lambda m: m.update(surprise=1), "unknown key 'surprise'"),
    (lambda m: m["schedule"].update(hard=-1), "schedule.hard"),
    (lambda m: m.update(seed=2**70), "seed"),
    (lambda m: m["layout"].update(width=10**31), "width"),
    (lambda m: m.pop("schedule"), "lacks metadata.schedule"),
    (lambda m: m["depth"].update(source="elsewhere"), "depth.source"),
    (lambda m: "[" * 100_000, "not valid JSON"),
    (lambda m: "1" * 5000, "not valid JSON"),
    (lambda m: [1, 2], "must be an object"),
])
def test_tampered_metadata_is_one_error(saved, tmp_path, capsys, change, message):
    png = write_with_meta(saved, saved.parent / "image.png", change)
    assert main(["render", "--from", str(png), "--out", str(tmp_path / "again"), *FAST]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("threedis: error:") and message in err, err


def test_parse_metadata_accepts_what_the_engine_writes(result):
    meta = outputs.metadata_for(result)
    assert parse_metadata(json.loads(json.dumps(meta)))["seed"] == result.seed
    with pytest.raises(MetadataError):
        parse_metadata({**meta, "chunk": True})


def test_mask_paths_in_metadata_are_never_opened(engine, depth_image_64_module, tmp_path, capsys):
    """A mask path in the metadata could name any image on the machine: only the mask saved beside is used."""
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(secret)
    user_mask = tmp_path / "mine.png"
    mask = np.zeros((64, 64), np.uint8)
    mask[0:32, 0:32] = 255
    Image.fromarray(mask).save(user_mask)
    rendered = engine.render(scene(mask=str(user_mask)), depth=depth_image_64_module, steps=1,
                             options=RenderOptions(chunk=8))
    image = rendered.save(tmp_path / "out")["image"]

    def point_at_secret(meta):
        meta["layout"]["instances"][0]["mask"] = "../secret.png"

    write_with_meta(image, image, point_at_secret)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)  # relative names resolve against the image's folder, not the working directory
    try:
        assert main(["render", "--from", str(image), "--out", str(tmp_path / "again"), *FAST]) == 0, \
            capsys.readouterr().err
    finally:
        os.chdir(cwd)
    again = tmp_path / "again" / "mask-0.png"
    assert np.array_equal(np.asarray(Image.open(again)), mask)  # the saved mask, not the secret
    (tmp_path / "out" / "mask-0.png").unlink()
    assert main(["render", "--from", str(image), "--out", str(tmp_path / "again2"), *FAST]) == EXIT_USER_ERROR
    assert "never opened" in capsys.readouterr().err
    assert not (tmp_path / "again2").exists() or not list((tmp_path / "again2").glob("*.png"))


def test_model_ids_in_metadata_stay_offline_unless_allowed(saved, tmp_path, monkeypatch, capsys):
    png = write_with_meta(saved, saved.parent / "image.png", lambda m: m.update(model="someone/some-model"))
    calls: list[bool] = []

    def resolve(path_or_id, local_files_only=False):
        calls.append(local_files_only)
        raise UserError(f"cannot get model {path_or_id!r}")

    monkeypatch.setattr("threedis.engine.loading.resolve_checkpoint", resolve)
    assert main(["render", "--from", str(png), "--out", str(tmp_path / "a"), *FAST]) == EXIT_USER_ERROR
    assert calls == [True] and "--allow-downloads" in capsys.readouterr().err
    assert main(["render", "--from", str(png), "--out", str(tmp_path / "b"), "--allow-downloads", *FAST]) == 2
    assert calls == [True, False]


def test_every_file_read_beside_the_image_follows_one_rule(saved, tmp_path, capsys):
    """depth.png and mask-<i>.png: a link to a file outside the image's folder is refused, as a LoRA there is."""
    outside = tmp_path / "elsewhere.png"
    Image.new("L", (64, 64), 255).save(outside)
    depth = saved.parent / "depth.png"
    kept = tmp_path / "kept-depth.png"
    depth.rename(kept)
    depth.symlink_to(outside)
    assert main(["render", "--from", str(saved), "--out", str(tmp_path / "a"), *FAST]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "depth.png beside it links to" in err and "outside the image's folder" in err
    depth.unlink()
    (saved.parent / "inside.png").write_bytes(kept.read_bytes())
    depth.symlink_to(saved.parent / "inside.png")  # a link that stays inside the folder is fine
    assert outputs.rerender_from_png(saved).render["depth"] == (saved.parent / "inside.png").resolve()
    depth.unlink()
    os.mkfifo(depth)  # not a file at all: said so, never opened (a pipe would block)
    with pytest.raises(UserError, match="named pipe"):
        outputs.rerender_from_png(saved)
    depth.unlink()
    depth.write_bytes(kept.read_bytes())

    def user_mask(meta):
        meta["masks"] = ["user", "box"]
        meta["layout"]["instances"][0]["mask"] = "mine.png"

    png = write_with_meta(saved, saved.parent / "image.png", user_mask)
    mask = saved.parent / "mask-0.png"
    mask.symlink_to(outside)
    with pytest.raises(UserError, match="mask-0.png beside it links to .*outside the image's folder"):
        outputs.rerender_from_png(png)
    mask.unlink()
    mask.write_bytes(outside.read_bytes())
    plan = outputs.rerender_from_png(png)
    assert plan.render["layout"].instances[0].mask == str(mask.resolve())


def test_lora_outside_the_image_folder_is_refused(saved, tmp_path, capsys):
    png = write_with_meta(saved, saved.parent / "image.png",
                          lambda m: m.update(loras=[{"path": "/etc/passwd", "scale": 1.0, "name": "lora0"}]))
    assert main(["render", "--from", str(png), "--out", str(tmp_path / "a"), *FAST]) == EXIT_USER_ERROR
    assert "outside the image's folder" in capsys.readouterr().err
