"""`threedis make-tiny KIND PATH`: every kind, readable files, safe targets only, and hints that lead to it.

The checkpoints themselves are checked in test_tiny.py (FLUX), test_stage1_pipeline.py
(LDM3D), test_sam_masks.py and test_depth_estimation.py; here they are loaded once
with the engine's own loaders, which is what a user passing the folder gets.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from threedis.engine import tiny
from threedis.engine.cli import EXIT_USER_ERROR, main
from threedis.engine.errors import UserError


@pytest.fixture
def umask_022():
    """A known umask, so "normal permissions" has one meaning in the assertions (0644 files, 0755 folders)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root: Path) -> set[tuple[str, int]]:
    """(kind, mode) of root and everything below it."""
    found = {("dir", stat.S_IMODE(root.stat().st_mode))}
    for path in root.rglob("*"):
        found.add(("dir" if path.is_dir() else "file", stat.S_IMODE(path.stat().st_mode)))
    return found


def _load(kind: str, folder: Path) -> object:
    """The folder through the loader its command-line option feeds."""
    if kind == "ldm3d":
        from threedis.engine.stage1.pipeline import Stage1Pipeline

        return Stage1Pipeline.from_pretrained(folder, device="cpu", local_files_only=True)
    if kind == "sam2":
        from threedis.engine.sam_masks import SamMasker

        return SamMasker.from_pretrained(folder, device="cpu", local_files_only=True)
    if kind == "grounding-dino":
        from threedis.engine.eval.models import GroundingDino

        return GroundingDino.from_pretrained(folder, device="cpu", local_files_only=True)
    if kind == "sam-vit":
        from threedis.engine.eval.models import SamViT

        return SamViT.from_pretrained(folder, device="cpu", local_files_only=True)
    from threedis.engine.depth_estimation import DepthEstimator

    return DepthEstimator.from_pretrained(folder, device="cpu", local_files_only=True)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("threedis: error: "), err
    return lines[0]


@pytest.mark.parametrize("kind", ["ldm3d", "sam2", "depth", "grounding-dino", "sam-vit"])
def test_each_kind_is_written_readable_and_loads(kind, tmp_path, capsys, umask_022):
    out = tmp_path / "new" / kind
    assert main(["make-tiny", kind, str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{tiny.KINDS[kind].option} {out.resolve()}" in printed
    assert any(out.rglob("*.safetensors")), "weights are written as safetensors"
    assert _modes(out) == {("dir", 0o755), ("file", 0o644)}, "other users must be able to read the checkpoint"
    assert _load(kind, out) is not None


def test_an_empty_folder_of_the_users_keeps_its_own_mode(tmp_path, umask_022):
    own = tmp_path / "private"
    own.mkdir(mode=0o700)
    assert main(["make-tiny", "depth", str(own)]) == 0
    assert stat.S_IMODE(own.stat().st_mode) == 0o700
    assert _modes(own) - {("dir", 0o700)} == {("file", 0o644)}


def test_cached_checkpoints_are_readable_too(tmp_path, umask_022):
    """The cache builds in a private temp folder (0700) and renames it: the result must still be 0755/0644."""
    folder = tiny.sam2.tiny_sam2_path(tmp_path)
    assert _modes(folder) == {("dir", 0o755), ("file", 0o644)}
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no probe or temp folder left behind


def _recording_kinds(monkeypatch) -> list[tuple[str, Path, int]]:
    """Replace every writer with one that records its call and writes a marker file."""
    calls = []
    for name, spec in tiny.KINDS.items():
        def write(path, seed=0, name=name):
            calls.append((name, Path(path), seed))
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "written").write_text(name)
            return Path(path)

        monkeypatch.setitem(tiny.KINDS, name, replace(spec, write=write))
    return calls


def test_a_bare_path_still_means_flux_and_all_writes_one_folder_per_kind(tmp_path, monkeypatch, capsys):
    calls = _recording_kinds(monkeypatch)
    assert main(["make-tiny", str(tmp_path / "old-style"), "--seed", "3"]) == 0
    assert calls == [("flux", (tmp_path / "old-style").resolve(), 3)]
    calls.clear()
    assert main(["make-tiny", "all", str(tmp_path / "every")]) == 0
    root = (tmp_path / "every").resolve()
    assert calls == [(name, root / name, 0) for name in ("flux", "ldm3d", "sam2", "depth", "grounding-dino",
                                                         "sam-vit")]
    printed = capsys.readouterr().out
    for name, spec in tiny.KINDS.items():
        assert f"{spec.option} {root / name}" in printed


@pytest.mark.parametrize("case", ["file", "non-empty", "etc", "under-usr", "root", "home", "flux-name", "ldm3d-name",
                                  "sam-name", "detector-name", "sam-vit-name", "unknown-kind", "kind-without-path"])
def test_unsafe_or_wrong_targets_are_refused_with_one_line(case, tmp_path, monkeypatch, capsys):
    calls = _recording_kinds(monkeypatch)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    argv, expected = {
        "file": (["flux", str(tmp_path / "file.txt")], "is a file"),
        "non-empty": (["sam2", str(tmp_path / "full")], "not empty"),
        "etc": (["flux", "/etc/tiny-flux"], "system"),
        "under-usr": (["depth", "/usr/local/share/tiny"], "system"),
        "root": (["all", "/"], "not empty"),
        "home": (["flux", str(home)], "system or shared"),
        "flux-name": (["flux", str(tmp_path / "models" / "FLUX.1-Depth-dev")], "real model"),
        "ldm3d-name": (["ldm3d", str(tmp_path / "LDM3D-4C")], "real model"),
        "sam-name": (["flux", str(tmp_path / "sam2.1-hiera-large")], "real model"),
        "detector-name": (["grounding-dino", str(tmp_path / "grounding-dino-tiny")], "real model"),
        "sam-vit-name": (["sam-vit", str(tmp_path / "hub" / "sam-vit-huge")], "real model"),
        "unknown-kind": (["fluxx", str(tmp_path / "new")], "unknown tiny checkpoint kind 'fluxx'"),
        "kind-without-path": (["ldm3d"], "threedis make-tiny ldm3d PATH"),
    }[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["make-tiny", *argv]) == EXIT_USER_ERROR
    line = _one_error_line(capsys.readouterr().err)
    assert expected in line
    assert calls == [] and sorted(p.name for p in tmp_path.rglob("*")) == before, "nothing may be written"
    if expected in ("is a file", "not empty", "system", "system or shared", "real model"):
        assert str(tiny.suggested_folder(argv[0])) in line, "the message names a safe folder instead"


def test_safe_folders_are_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("THREEDIS_CACHE", str(tmp_path / "cache"))
    scratch = Path("/tmp/threedis-tiny-check-never-made")  # a subfolder of a shared root is fine
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "tiny", tmp_path / "empty", tiny.suggested_folder("flux"), scratch):
        assert tiny.store.check_new_folder(folder, ["black-forest-labs/FLUX.1-Depth-dev"]) == folder.resolve()
    assert not scratch.exists(), "checking writes nothing"


def test_each_kind_stands_in_for_the_engines_default_model():
    from threedis.engine.depth_estimation import DEFAULT_DEPTH_MODEL
    from threedis.engine.eval.protocol import DEFAULT_DETECTOR, DEFAULT_SEGMENTER
    from threedis.engine.loading import DEFAULT_MODEL_ID
    from threedis.engine.sam_masks import DEFAULT_SAM_MODEL
    from threedis.engine.stage1.pipeline import DEFAULT_BASE_ID

    stands_in = {name: spec.stands_in_for for name, spec in tiny.KINDS.items()}
    assert stands_in == {"flux": DEFAULT_MODEL_ID, "ldm3d": DEFAULT_BASE_ID, "sam2": DEFAULT_SAM_MODEL,
                         "depth": DEFAULT_DEPTH_MODEL, "grounding-dino": DEFAULT_DETECTOR,
                         "sam-vit": DEFAULT_SEGMENTER}


# ------------------------------------------------------------------ the hints lead to the command

_HINTED = re.compile(r"`threedis make-tiny ([\w-]+) ([^`]+)`[^`]*then pass `(--[\w-]+) ([^`]+)`")


def _missing_model_error(kind: str, where: str) -> str:
    with pytest.raises(UserError) as info:
        if kind == "flux":
            from threedis.engine.loading import resolve_checkpoint

            resolve_checkpoint(where, local_files_only=True)
        else:
            _load(kind, Path(where))
    return str(info.value)


@pytest.mark.parametrize("kind, where", [
    ("flux", "/models/FLUX.1-Depth-dev"),  # the hint once said `threedis make-tiny /models/FLUX.1-Depth-dev`
    ("ldm3d", "/nowhere/ldm3d-4c"),
    ("ldm3d", "Intel/ldm3d-4c"),  # the hub id, offline: "cannot get the stage-1 base model"
    ("sam2", "/nowhere/sam2"),
    ("depth", "facebook/not-a-depth-model"),
    ("grounding-dino", "/nowhere/grounding-dino"),
    ("sam-vit", "facebook/not-a-sam"),
])
def test_missing_model_errors_name_make_tiny_with_a_safe_folder(kind, where, tmp_path, monkeypatch):
    monkeypatch.setenv("THREEDIS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _missing_model_error(kind, where)
    assert "\n" not in message
    found = _HINTED.search(message)
    assert found, message
    hinted_kind, folder, option, passed = found.groups()
    assert (hinted_kind, option) == (kind, tiny.KINDS[kind].option) and passed == folder
    assert Path(folder) == tiny.suggested_folder(kind) and Path(folder).is_relative_to(tmp_path / "cache")
    assert f"make-tiny {where}" not in message and "threedis.engine" not in message, "no Python call, no real path"


@pytest.mark.parametrize("kind", ["ldm3d", "sam2", "depth"])
def test_following_the_hint_gives_a_folder_that_loads(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("THREEDIS_CACHE", str(tmp_path / "cache"))
    hinted_kind, folder, _, _ = _HINTED.search(_missing_model_error(kind, "/nowhere/model")).groups()
    assert main(["make-tiny", hinted_kind, folder]) == 0, capsys.readouterr().err
    assert _load(kind, Path(folder)) is not None
