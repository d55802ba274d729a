"""SAM2 mask enhancement (SPEC 7) on a tiny random-weight Sam2Model, plus plumbing with stub maskers.

References: hand-computed pixel boxes, torch's antialiased resize for the preprocessing,
a bilinear up-sampling written here in numpy for the post-processing, brute-force token
coverage, and (when torchvision is installed) transformers' own Sam2Processor.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from threedis.engine.errors import UserError
from threedis.engine.layout import Instance, Layout
from threedis.engine.sam_masks import SamMasker, boxes_to_pixels, enhance_regions, token_regions
from threedis.engine.tiny.sam2 import TINY_SAM2, tiny_sam2_path, write_tiny_sam2
from threedis.kernels.rule import box_regions, mask_regions
from stub_masker import LeftHalfMasker

_MODEL_SIZE = TINY_SAM2["preprocessor"]["size"]["height"]


@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sam2(tmp_path_factory.mktemp("tiny-sam2"), seed=0)


@pytest.fixture(scope="module")
def masker(tiny_sam_dir: Path) -> SamMasker:
    return SamMasker.from_pretrained(tiny_sam_dir, device="cpu")


def _depth(width: int = 96, height: int = 64) -> Image.Image:
    img = Image.linear_gradient("L").rotate(90).resize((width, height)).convert("RGB")
    ImageDraw.Draw(img).ellipse((width // 5, height // 6, width // 2, height * 5 // 6), fill=(235, 235, 235))
    return img


def _layout(boxes, width: int = 96, height: int = 64) -> Layout:
    return Layout(prompt="a scene", width=width, height=height,
                  instances=tuple(Instance(prompt=f"thing {i}", box=b) for i, b in enumerate(boxes)))


# -- tiny checkpoint ------------------------------------------------------------------------


def test_tiny_checkpoint_loads_with_real_classes(tiny_sam_dir: Path) -> None:
    from transformers import AutoModel, Sam2Model

    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in tiny_sam_dir.iterdir()}
    model = Sam2Model.from_pretrained(tiny_sam_dir)
    assert isinstance(AutoModel.from_pretrained(tiny_sam_dir), Sam2Model)
    assert model.config.model_type == "sam2"
    assert model.config.vision_config.backbone_config.model_type == "sam2_hiera_det_model"
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_tiny_writer_is_deterministic_and_cached(tmp_path: Path) -> None:
    def digest(p: Path) -> str:
        return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()

    a, b = write_tiny_sam2(tmp_path / "a"), write_tiny_sam2(tmp_path / "b")
    assert digest(a) == digest(b) != digest(write_tiny_sam2(tmp_path / "c", seed=1))
    cached = tiny_sam2_path(tmp_path / "cache")
    assert tiny_sam2_path(tmp_path / "cache") == cached and digest(cached) == digest(a)


# -- boxes ------------------------------------------------------------------------------------


def test_boxes_to_pixels_floor_and_ceil() -> None:
    boxes = [
        (0.1, 0.25, 0.55, 0.7),       # exact products: 10, 10, 55, 28
        (0.123, 0.011, 0.501, 0.999),  # 12.3 -> 12, 0.44 -> 0, 50.1 -> 51, 39.96 -> 40
        (0.07, 0.29, 0.29, 0.57),     # float noise: 7.000000000000001 and 28.999999999999996 are 7 and 29
        (-0.2, 0.0, 1.3, 1.0),        # clipped to the image
    ]
    assert boxes_to_pixels(boxes, 100, 40) == [(10, 10, 55, 28), (12, 0, 51, 40), (7, 11, 29, 23), (0, 0, 100, 40)]


# -- the real tiny model -----------------------------------------------------------------------


def test_one_boolean_mask_per_box_at_image_size(masker: SamMasker) -> None:
    boxes = [(9, 6, 48, 39), (38, 19, 92, 58), (0, 0, 96, 64)]
    masks = masker.masks(_depth(), boxes)
    assert len(masks) == 3
    for m in masks:
        assert m.dtype == torch.bool and tuple(m.shape) == (64, 96)
    again = masker.masks(_depth(), boxes)
    assert all(torch.equal(a, b) for a, b in zip(masks, again))
    assert masker.masks(_depth(), []) == []


def test_preprocessing_matches_antialiased_resize(masker: SamMasker) -> None:
    """SamPreprocess.pixels vs torch's antialiased bilinear resize (what torchvision does for Sam2ImageProcessor)."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 110, 3), dtype=np.uint8))
    got = masker.prep.pixels(img)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].double()
    x = F.interpolate(x, size=(_MODEL_SIZE, _MODEL_SIZE), mode="bilinear", antialias=True, align_corners=False)
    x = x.round().clamp(0, 255) / 255.0
    ref = (x - torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)[:, None, None]) / \
        torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)[:, None, None]
    assert got.shape == (1, 3, _MODEL_SIZE, _MODEL_SIZE)
    err = (got.double() - ref).abs()
    print("max / mean preprocessing error", err.max().item(), err.mean().item())
    assert err.max() < 0.05 and err.mean() < 0.01  # about one grey level / std


def _bilinear_up(low: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize (align_corners=False), written out in float64."""
    in_h, in_w = low.shape

    def taps(n_out: int, n_in: int):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    r0, r1, fr = taps(out_h, in_h)
    c0, c1, fc = taps(out_w, in_w)
    top = low[r0][:, c0] * (1 - fc) + low[r0][:, c1] * fc
    bottom = low[r1][:, c0] * (1 - fc) + low[r1][:, c1] * fc
    return top * (1 - fr[:, None]) + bottom * fr[:, None]


def test_masks_are_sam2_logits_upsampled_and_thresholded(masker: SamMasker) -> None:
    """Boxes scaled per axis to the model size (hand values), logits up-sampled bilinearly, > 0."""
    img = _depth(96, 64)
    boxes_px = [(9, 6, 48, 39), (38, 19, 92, 58)]
    scaled = torch.tensor([[[9 * 64 / 96, 6.0, 48 * 64 / 96, 39.0], [38 * 64 / 96, 19.0, 92 * 64 / 96, 58.0]]])
    assert torch.allclose(masker.prep.boxes(boxes_px, 96, 64), scaled)
    with torch.no_grad():
        out = masker.model(pixel_values=masker.prep.pixels(img), input_boxes=scaled, multimask_output=False)
    assert out.pred_masks.shape[:3] == (1, 2, 1)  # one mask per box: no multimask
    got = masker.masks(img, boxes_px)
    for k in range(2):
        up = _bilinear_up(out.pred_masks[0, k, 0].double().numpy(), 64, 96)
        ref = up > 0
        ambiguous = np.abs(up) < 1e-5  # float32 vs float64 rounding right at the threshold
        assert (got[k].numpy() == ref)[~ambiguous].all()


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="Sam2Processor needs torchvision (not a dependency of this project)")
def test_matches_transformers_sam2_processor(tiny_sam_dir: Path, masker: SamMasker) -> None:
    from transformers import Sam2Processor

    processor = Sam2Processor.from_pretrained(tiny_sam_dir)
    img, boxes_px = _depth(96, 64), [[9, 6, 48, 39], [38, 19, 92, 58]]
    inputs = processor(images=img, input_boxes=[boxes_px], return_tensors="pt")
    assert (inputs["pixel_values"] - masker.prep.pixels(img)).abs().max() < 0.05
    assert torch.allclose(inputs["input_boxes"], masker.prep.boxes(boxes_px, 96, 64))
    with torch.no_grad():
        out = masker.model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                           multimask_output=False)
    ref = processor.post_process_masks(out.pred_masks, inputs["original_sizes"])[0][:, 0]
    got = torch.stack(masker.masks(img, boxes_px))
    assert (ref == got).float().mean() > 0.98  # preprocessing differs by rounding only


# -- regions ---------------------------------------------------------------------------------


def test_user_mask_skips_sam_for_that_instance() -> None:
    layout = _layout([(0.0, 0.0, 0.5, 0.5), (0.25, 0.25, 0.75, 1.0), (0.5, 0.5, 1.0, 1.0)])
    user = Image.new("L", (48, 32), 0)  # half the output size: resized up
    ImageDraw.Draw(user).rectangle((0, 0, 23, 31), fill=255)
    spy = LeftHalfMasker()
    masks = enhance_regions(layout, _depth(), spy, [None, user, None])
    assert len(spy.calls) == 1
    assert spy.calls[0][1] == boxes_to_pixels([layout.instances[0].box, layout.instances[2].box], 96, 64)
    assert tuple(masks[1].shape) == (64, 96) and masks[1].dtype == torch.float32
    assert masks[1][:, :40].min() == 1 and masks[1][:, 56:].max() == 0  # the user's left half, not SAM's
    assert masks[0].dtype == torch.bool and masks[2].dtype == torch.bool


def test_every_instance_masked_by_user_means_no_sam_call() -> None:
    layout = _layout([(0.0, 0.0, 0.5, 0.5)])
    spy = LeftHalfMasker()
    masks = enhance_regions(layout, _depth(), spy, [torch.ones(64, 96)])
    assert spy.calls == [] and torch.equal(masks[0], torch.ones(64, 96))


def test_sam_runs_on_the_depth_resized_to_the_output_size() -> None:
    layout = _layout([(0.1, 0.2, 0.6, 0.9)], width=96, height=64)
    spy = LeftHalfMasker()
    enhance_regions(layout, _depth(300, 170), spy)
    assert spy.calls == [((96, 64), [(9, 12, 58, 58)])]


def test_without_masker_or_with_empty_mask_the_box_is_used() -> None:
    layout = _layout([(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)])
    assert enhance_regions(layout, _depth(), None) == [None, None]

    class Empty:
        def masks(self, image, boxes_px):
            return [torch.zeros(image.size[1], image.size[0], dtype=torch.bool) for _ in boxes_px]

    masks = enhance_regions(layout, _depth(), Empty())
    assert masks == [None, None]
    assert torch.equal(token_regions(layout, masks), box_regions(layout.boxes, *layout.grid))


def test_stub_masks_change_the_token_regions() -> None:
    """Left-half masks -> brute-force expected coverage on the 4 x 6 token grid."""
    layout = _layout([(0.0, 0.0, 1.0, 1.0), (0.5, 0.25, 1.0, 0.75)])
    masks = enhance_regions(layout, _depth(), LeftHalfMasker())
    regions = token_regions(layout, masks)
    expected = torch.zeros(2, 4, 6, dtype=torch.bool)
    expected[0, :, 0:3] = True  # pixels x < 48 -> token columns 0..2
    expected[1, 1:3, 3:5] = True  # pixels x in [48, 72), y in [16, 48)
    assert torch.equal(regions, expected)
    assert not torch.equal(regions, box_regions(layout.boxes, 4, 6))


def test_tiny_sam_masks_reach_the_rule(masker: SamMasker) -> None:
    """Real tiny SAM2: boolean masks at output size, and mask_regions of them is not the box cover."""
    layout = _layout([(0.1, 0.1, 0.5, 0.6), (0.4, 0.3, 0.95, 0.9)])
    masks = enhance_regions(layout, _depth(), masker)
    for m in masks:
        if m is not None:
            assert m.dtype == torch.bool and tuple(m.shape) == (64, 96)
    kept = [m for m in masks if m is not None]
    assert kept, "the seeded tiny SAM2 returned empty masks for every box: nothing reached the rule"
    regions = token_regions(layout, masks)
    assert torch.equal(regions[[i for i, m in enumerate(masks) if m is not None]], mask_regions(kept, *layout.grid))
    assert not torch.equal(regions, box_regions(layout.boxes, *layout.grid))


def test_user_mask_count_must_match(masker: SamMasker) -> None:
    with pytest.raises(UserError, match="2 instances"):
        enhance_regions(_layout([(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)]), _depth(), masker, [None])


# -- loading errors ------------------------------------------------------------------------------


def test_missing_folder_says_how_to_get_the_model(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="sam2.1-hiera-large") as info:
        SamMasker.from_pretrained(tmp_path / "nope", device="cpu")
    assert "not found" in str(info.value)


def test_incomplete_folder_lists_missing_files(tiny_sam_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_sam_dir / "config.json").read_bytes())
    with pytest.raises(UserError, match="model.safetensors"):
        SamMasker.from_pretrained(tmp_path, device="cpu")


def test_uncached_hub_id_offline_is_a_user_error() -> None:
    with pytest.raises(UserError, match="local hub cache"):
        SamMasker.from_pretrained("threedis-test/no-such-sam2", device="cpu", local_files_only=True)


def test_bfloat16_weights_give_boolean_masks(tiny_sam_dir: Path) -> None:
    half = SamMasker.from_pretrained(tiny_sam_dir, device="cpu", dtype=torch.bfloat16)
    masks = half.masks(_depth(), [(9, 6, 48, 39)])
    assert masks[0].dtype == torch.bool and tuple(masks[0].shape) == (64, 96)


def test_no_files_written_while_masking(masker: SamMasker, tmp_path: Path, monkeypatch) -> None:
    """No debug files: masking writes nothing anywhere (outputs are saved by save_result only)."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    enhance_regions(_layout([(0.1, 0.1, 0.5, 0.6), (0.4, 0.3, 0.95, 0.9)]), _depth(300, 170), masker)
    assert list(tmp_path.rglob("*")) == [work]
