"""The whole method from one call: stage 1 -> SAM2 -> FLUX on the tiny checkpoints.

References: stage 1 run on its own (Stage1Pipeline) for the depth the render used;
per-cell brute force for the token regions of a known mask; weakrefs for freeing.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import numpy as np
import pytest
from PIL import Image

from threedis.engine.api import Engine, RenderCancelled
from threedis.engine.errors import UserError
from threedis.engine.layout import Instance, Layout
from threedis.engine.outputs import read_metadata, render_kwargs_from_metadata, save_result
from threedis.engine.sam_masks import boxes_to_pixels
from threedis.engine.api import RenderOptions, Stage1Options
from stub_masker import LeftHalfMasker

from closeness import assert_images_close

CHUNK = 16
FAST_STAGE1 = dict(steps=2, size=64, migc_steps=1)
FAST = dict(steps=2, options=RenderOptions(chunk=CHUNK), stage1=Stage1Options(**FAST_STAGE1))
BOXES = [(0.1, 0.2, 0.5, 0.8), (0.5, 0.25, 1.0, 0.75)]


def scene(width: int = 64, height: int = 64, masks: tuple[str | None, ...] = (None, None)) -> Layout:
    return Layout("a garden at dawn", width, height, tuple(
        Instance(p, b, mask=m) for p, b, m in zip(("a red bird", "a blue jay"), BOXES, masks)))


@pytest.fixture(scope="module")
def aux_paths() -> dict[str, Any]:
    from threedis.engine.tiny.depth import tiny_depth_anything_path
    from threedis.engine.tiny.ldm3d import tiny_ldm3d_path
    from threedis.engine.tiny.sam2 import tiny_sam2_path

    return {"stage1": tiny_ldm3d_path(), "sam": tiny_sam2_path(), "depth_estimator": tiny_depth_anything_path()}


@pytest.fixture(scope="module")
def engine(tiny_flux_dir, aux_paths, tmp_path_factory) -> Engine:
    return Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa",
                                  cache_dir=tmp_path_factory.mktemp("e2e-cache"), **aux_paths)


def capture_tokens(transformer) -> tuple[list, Any]:
    seen: list = []

    def hook(module, args, kwargs):
        call = (kwargs.get("joint_attention_kwargs") or {}).get("threedis")
        if call is not None and call.tokens is not None:
            seen.append(call.tokens)

    return seen, transformer.register_forward_pre_hook(hook, with_kwargs=True)


def brute_force_cover(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Cells of a pixel mask on the token grid for masks aligned to whole cells: any pixel inside counts."""
    gh, gw = grid
    ch, cw = mask.shape[0] // gh, mask.shape[1] // gw
    return np.array([[mask[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw].any() for c in range(gw)] for r in range(gh)])


# ------------------------------------------------------------------ the whole method


def test_render_without_depth_runs_every_stage(engine, aux_paths, tmp_path):
    from threedis.engine.stage1 import Stage1Pipeline

    stage1_steps: list[tuple[int, int]] = []
    result = engine.render(scene(), seed=5, sam=True, on_stage1_step=lambda d, t: stage1_steps.append((d, t)),
                           **FAST)
    assert result.image.size == (64, 64) and result.depth.size == (64, 64)
    assert result.stage1_rgb is not None and result.stage1_rgb.size == (64, 64)
    assert stage1_steps == [(1, 2), (2, 2)]
    names = [s.name for s in result.report.stages]
    for name in ("stage1", "load stage1", "sam", "load sam", "encode", "step", "decode"):
        assert name in names
    assert names.index("stage1") < names.index("sam") < names.index("encode") < names.index("step")
    load1 = result.report.stages[names.index("load stage1")].info  # the profile's entries, one report
    assert load1["ldm3d_unet"] == load1["ldm3d_vae"] == load1["ldm3d_text"] == "fp32@cpu"
    assert engine.aux.live == {}

    # The depth used is stage 1's own output for this layout and seed (stage1_seed defaults to seed).
    ref = Stage1Pipeline.from_pretrained(aux_paths["stage1"], device="cpu", local_files_only=True).generate(
        "a garden at dawn", ["a red bird", "a blue jay"], BOXES, width=64, height=64, steps=2, migc_steps=1, seed=5)
    assert_images_close(result.depth.convert("L"), ref.depth)  # a second load of stage 1
    assert_images_close(result.stage1_rgb, ref.rgb)

    assert len(result.masks) == 2
    for mask, source in zip(result.masks, result.settings["masks"]):
        assert source in ("sam", "box") and (mask is None) == (source == "box")
        if mask is not None:
            assert mask.mode == "L" and mask.size == (64, 64)
    assert result.settings["depth"]["source"] == "stage1" and result.settings["depth"]["steps"] == 2
    assert result.settings["sam"]["ran"] is True

    paths = save_result(result, tmp_path)
    assert {"image", "depth", "stage1_rgb", "report"} <= set(paths)
    for i, mask in enumerate(result.masks):
        assert (f"mask-{i}" in paths) == (mask is not None)
    meta = read_metadata(paths["image"])
    assert meta["depth"]["source"] == "stage1" and meta["depth"]["size"] == [64, 64] and meta["sam"]["ran"]


def test_depth_from_layout_is_stage_1_alone(engine, aux_paths):
    """The service's "Make depth": stage 1's output for the layout and seed, nothing rendered, stage 1 freed."""
    steps: list[tuple[int, int]] = []
    from threedis.engine.stage1 import Stage1Pipeline

    made = engine.depth_from_layout(scene(), seed=5, stage1=Stage1Options(**FAST_STAGE1),
                                    on_stage1_step=lambda d, t: steps.append((d, t)))
    ref = Stage1Pipeline.from_pretrained(aux_paths["stage1"], device="cpu", local_files_only=True).generate(
        "a garden at dawn", ["a red bird", "a blue jay"], BOXES, width=64, height=64, steps=2, migc_steps=1, seed=5)
    assert_images_close(made.depth, ref.depth)
    assert_images_close(made.rgb, ref.rgb)
    assert steps == [(1, 2), (2, 2)] and engine.aux.live == {}
    assert made.settings["source"] == "stage1" and made.settings["seed"] == 5
    assert "stage1" in [s.name for s in made.report.stages]
    with pytest.raises(UserError, match="seed"):
        engine.depth_from_layout(scene(), seed=-1)


def test_without_stage1_options_a_tiny_stage1_runs_at_the_demos_size(engine):
    """Engine.render / depth_from_layout with no Stage1Options: the tiny checkpoint's 4 steps at 64 px."""
    made = engine.depth_from_layout(scene(), seed=1)
    assert (made.settings["steps"], made.settings["migc_steps"], made.settings["size"]) == (4, 2, [64, 64])
    assert made.depth.size == (64, 64)


def test_metadata_without_depth_reruns_stage1_to_the_same_image(engine, tmp_path):
    first = engine.render(scene(), seed=2, **{**FAST, "stage1": Stage1Options(negative_prompt="blurry, dark",
                                                                              **FAST_STAGE1)})
    meta = read_metadata(save_result(first, tmp_path)["image"])
    kwargs = render_kwargs_from_metadata(meta)  # no depth: stage 1 runs again with the saved settings
    assert "depth" not in kwargs and kwargs["stage1"].size == (64, 64)
    assert kwargs["stage1"].negative_prompt == "blurry, dark"
    again = engine.render(**kwargs)
    assert np.array_equal(np.asarray(again.image), np.asarray(first.image))


def test_user_depth_skips_stage1_and_records_it(engine, depth_image_64):
    result = engine.render(scene(), depth=depth_image_64, steps=1, options=RenderOptions(chunk=CHUNK))
    assert result.stage1_rgb is None and result.masks == [None, None]
    assert result.settings["depth"] == {"source": "user"} and result.settings["sam"]["ran"] is False
    assert "stage1" not in [s.name for s in result.report.stages]


def test_no_stage1_model_and_no_depth_says_what_to_do(tiny_flux_dir, tmp_path):
    plain = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path)
    with pytest.raises(UserError, match="no depth map given.*stage1='auto'"):
        plain.render(scene(), steps=1)


@pytest.mark.parametrize("bad, message", [(dict(size=60), "stage1_size"), (dict(steps=0), "stage1_steps"),
                                          (dict(migc_steps=-1), "migc_steps"), (dict(size="64x9"), "stage1_size")])
def test_bad_stage1_settings_fail_before_loading(engine, bad, message, monkeypatch):
    monkeypatch.setitem(engine.aux.loaders, "stage1", lambda spec: pytest.fail("stage 1 loaded"))
    with pytest.raises(UserError, match=message):
        engine.render(scene(), steps=1, stage1=Stage1Options(**bad))


def test_stage1_size_reads_the_same_in_the_api_and_the_cli():
    from threedis.engine.cli import build_parser

    args = build_parser().parse_args(["render", "x.json", "--stage1-size", "96x64"])
    assert args.stage1_size == Stage1Options(size="96x64").size == Stage1Options(size=(96, 64)).size == (96, 64)
    assert Stage1Options(size=64).size == Stage1Options(size="64").size == (64, 64)


# ------------------------------------------------------------------ masks


def test_user_masks_bypass_sam(engine, depth_image_64, tmp_path, monkeypatch):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:16] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    loads: list[str] = []
    monkeypatch.setitem(engine.aux.loaders, "sam", lambda spec: loads.append(spec) or LeftHalfMasker())

    both = scene(masks=(str(tmp_path / "m.png"), str(tmp_path / "m.png")))
    result = engine.render(both, depth=depth_image_64, sam=True, steps=1, options=RenderOptions(chunk=CHUNK))
    assert loads == []  # every instance has a user mask: SAM is not even loaded
    assert result.settings["masks"] == ["user", "user"] and result.settings["sam"]["ran"] is False
    assert np.array_equal(np.asarray(result.masks[0]), mask)
    assert "sam" not in [s.name for s in result.report.stages]

    stub = LeftHalfMasker()
    monkeypatch.setitem(engine.aux.loaders, "sam", lambda spec: loads.append(spec) or stub)
    one = scene(masks=(str(tmp_path / "m.png"), None))
    result = engine.render(one, depth=depth_image_64, sam=True, steps=1, options=RenderOptions(chunk=CHUNK))
    assert len(loads) == 1 and loads[0] == str(engine.aux.specs["sam"])
    assert stub.calls == [((64, 64), boxes_to_pixels([BOXES[1]], 64, 64))]  # only the instance without a mask
    assert result.settings["masks"] == ["user", "sam"]


def test_sam_masks_become_the_token_regions(engine, monkeypatch):
    monkeypatch.setitem(engine.aux.loaders, "sam", lambda spec: LeftHalfMasker())
    depth = Image.linear_gradient("L").resize((96, 48))  # other size: SAM sees it at the output size
    layout = Layout("a garden", 128, 64, (Instance("a red bird", (0.125, 0.25, 0.625, 1.0)),
                                          Instance("a blue jay", (0.5, 0.0, 1.0, 0.5))))
    seen, handle = capture_tokens(engine.components.transformer)
    try:
        result = engine.render(layout, depth=depth, sam=True, steps=1, options=RenderOptions(chunk=CHUNK))
    finally:
        handle.remove()
    assert result.settings["masks"] == ["sam", "sam"]
    # Left halves: x in [16, 48) and [64, 96) px; both aligned to the 16 px token cells of the 4 x 8 grid.
    expected_bits = np.zeros((4, 8), np.int64)
    for i, mask in enumerate(result.masks):
        pixels = np.asarray(mask) > 0
        assert pixels.shape == (64, 128)
        expected_bits |= brute_force_cover(pixels, (4, 8)).astype(np.int64) << i
    tokens = seen[0]
    member = tokens.member[tokens.text_len:].reshape(4, 8).numpy()
    assert np.array_equal(member, expected_bits)
    box_bits = np.zeros((4, 8), np.int64)
    box_bits[1:4, 1:5] |= 1
    box_bits[0:2, 4:8] |= 2
    assert not np.array_equal(member, box_bits)  # the masks, not the boxes, made the regions


# ------------------------------------------------------------------ cancellation and freeing


def _tracking_loader(engine: Engine, kind: str, refs: list) -> Any:
    original = engine.aux.loaders[kind]

    def load(spec):
        model = original(spec)
        refs.append(weakref.ref(model))
        return model

    return load


def test_cancel_inside_stage1_frees_it(engine, monkeypatch):
    refs: list = []
    monkeypatch.setitem(engine.aux.loaders, "stage1", _tracking_loader(engine, "stage1", refs))
    cancel = threading.Event()
    denoised: list[int] = []

    def on_stage1_step(done: int, total: int) -> None:
        if done == 1:
            cancel.set()

    with pytest.raises(RenderCancelled, match="stage 1 cancelled before step 2") as caught:
        engine.render(scene(), cancel=cancel, on_stage1_step=on_stage1_step,
                      on_step=lambda *a: denoised.append(1), **{**FAST, "stage1": Stage1Options(**{**FAST_STAGE1, "steps": 3})})
    gc.collect()
    assert caught.value.__traceback__ is not None  # the error (and its traceback) is still held here...
    assert len(refs) == 1 and refs[0]() is None  # ...yet the stage-1 model is gone
    assert engine.aux.live == {} and denoised == []
    assert engine.render(scene(), **FAST).image.size == (64, 64)  # still usable


def test_cancel_between_stages_frees_every_aux_model(engine, monkeypatch):
    refs: list = []
    monkeypatch.setitem(engine.aux.loaders, "stage1", _tracking_loader(engine, "stage1", refs))
    cancel = threading.Event()

    def on_stage1_step(done: int, total: int) -> None:
        if done == total:
            cancel.set()  # stage 1 finishes its last step; its decode check stops the render

    with pytest.raises(RenderCancelled) as first:  # kept: its traceback must not keep models alive
        engine.render(scene(), cancel=cancel, on_stage1_step=on_stage1_step, sam=True, **FAST)

    class CancellingMasker(LeftHalfMasker):
        def masks(self, image, boxes_px):
            cancel.set()  # set during SAM: the render stops before stage 2
            return super().masks(image, boxes_px)

    cancel.clear()
    masker = CancellingMasker()
    refs.append(weakref.ref(masker))
    monkeypatch.setitem(engine.aux.loaders, "sam", lambda spec, m=masker: m)
    del masker
    with pytest.raises(RenderCancelled, match="before stage 2") as second:
        engine.render(scene(), cancel=cancel, sam=True, **FAST)
    gc.collect()
    monkeypatch.undo()  # the lambda above holds the masker; drop it too
    gc.collect()
    assert first.value is not second.value
    assert len(refs) == 3 and all(r() is None for r in refs)
    assert engine.aux.live == {}
    assert not any(isinstance(v, LeftHalfMasker) for v in vars(engine).values())


# ------------------------------------------------------------------ depth from a photo


def test_depth_from_image_is_grey_at_the_right_size(engine, tmp_path):
    photo = Image.linear_gradient("L").resize((40, 30)).convert("RGB")
    depth = engine.depth_from_image(photo)
    assert depth.mode == "L" and depth.size == (40, 30)
    photo.save(tmp_path / "photo.jpg")
    sized = engine.depth_from_image(tmp_path / "photo.jpg", size=(64, 48))
    assert sized.mode == "L" and sized.size == (64, 48)
    assert engine.aux.live == {}
    with pytest.raises(UserError, match="photo .*: not found"):
        engine.depth_from_image(tmp_path / "missing.jpg")
