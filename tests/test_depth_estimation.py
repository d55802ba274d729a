"""Depth Anything V2 through transformers, on a tiny random-weight checkpoint.

References are transformers' own processor/model/post-processing and a min-max
stretch written here in numpy; the tiny checkpoint must load with the real Auto classes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from threedis.engine.depth_estimation import DepthEstimator, normalize_depth
from threedis.engine.errors import UserError
from threedis.engine.tiny.depth import tiny_depth_anything_path, write_tiny_depth_anything


@pytest.fixture(scope="module")
def tiny_depth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_depth_anything(tmp_path_factory.mktemp("tiny-depth"), seed=0)


@pytest.fixture(scope="module")
def estimator(tiny_depth_dir: Path) -> DepthEstimator:
    return DepthEstimator.from_pretrained(tiny_depth_dir, device="cpu")


@pytest.fixture
def photo() -> Image.Image:
    """A 90 x 61 (odd, non-square) picture with a gradient and a bright disc."""
    img = Image.linear_gradient("L").resize((90, 61)).convert("RGB")
    ImageDraw.Draw(img).ellipse((20, 10, 60, 50), fill=(250, 240, 200))
    return img


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_checkpoint_loads_with_auto_classes(tiny_depth_dir: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation, DepthAnythingForDepthEstimation

    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in tiny_depth_dir.iterdir()}
    model = AutoModelForDepthEstimation.from_pretrained(tiny_depth_dir)
    processor = AutoImageProcessor.from_pretrained(tiny_depth_dir)
    assert isinstance(model, DepthAnythingForDepthEstimation)
    assert model.config.backbone_config.model_type == "dinov2"
    assert model.config.depth_estimation_type == "relative"
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert hasattr(processor, "post_process_depth_estimation")


def test_tiny_writer_is_deterministic(tmp_path: Path) -> None:
    a = write_tiny_depth_anything(tmp_path / "a", seed=0)
    b = write_tiny_depth_anything(tmp_path / "b", seed=0)
    c = write_tiny_depth_anything(tmp_path / "c", seed=1)
    assert _digest(a) == _digest(b) != _digest(c)


def test_tiny_path_is_cached(tmp_path: Path) -> None:
    first = tiny_depth_anything_path(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny_depth_anything_path(tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


@pytest.mark.parametrize("size", [None, (50, 37), (128, 96)])
def test_estimate_is_grey_at_requested_size_and_stretched(estimator: DepthEstimator, photo: Image.Image, size) -> None:
    depth = estimator.estimate(photo, size=size)
    assert depth.mode == "L"
    assert depth.size == (size or photo.size)
    assert depth.getextrema() == (0, 255)


def test_estimate_matches_transformers_reference(tiny_depth_dir: Path, estimator: DepthEstimator,
                                                 photo: Image.Image) -> None:
    """transformers' processor -> model -> post_process_depth_estimation, then a numpy min-max stretch."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(tiny_depth_dir)
    model = AutoModelForDepthEstimation.from_pretrained(tiny_depth_dir).eval()
    with torch.no_grad():
        out = model(**processor(images=photo, return_tensors="pt"))
    ref = processor.post_process_depth_estimation(out, target_sizes=[(40, 70)])[0]["predicted_depth"].double().numpy()
    ref = np.round((ref - ref.min()) / (ref.max() - ref.min()) * 255)
    got = np.asarray(estimator.estimate(photo, size=(70, 40)), dtype=np.float64)
    assert got.shape == ref.shape == (40, 70)
    diff = np.abs(got - ref)
    print("max grey-level diff", diff.max())
    assert diff.max() <= 1


def test_estimate_is_deterministic_and_reads_paths(estimator: DepthEstimator, photo: Image.Image,
                                                   tmp_path: Path) -> None:
    file = tmp_path / "photo.png"
    photo.save(file)
    a = estimator.estimate(photo, size=(64, 48))
    b = estimator.estimate(photo, size=(64, 48))
    c = estimator.estimate(file, size=(64, 48))
    assert a.tobytes() == b.tobytes() == c.tobytes()


class _RampModel:
    """Stands in for the network: predicts a disparity that grows to the right (right = nearer)."""

    def __call__(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        h, w = pixel_values.shape[-2:]
        return SimpleNamespace(predicted_depth=torch.linspace(0.0, 3.0, w).expand(1, h, w).clone())


def test_near_is_bright(estimator: DepthEstimator, photo: Image.Image) -> None:
    stub = DepthEstimator(model=_RampModel(), processor=estimator.processor, device=torch.device("cpu"),
                          dtype=torch.float32)
    depth = np.asarray(stub.estimate(photo, size=(40, 8)), dtype=np.int64)
    assert depth[:, 0].max() == 0 and depth[:, -1].min() == 255
    assert (np.diff(depth, axis=1) >= 0).all()


def test_constant_depth_is_black() -> None:
    assert normalize_depth(torch.full((5, 7), 2.5)).getextrema() == (0, 0)


def test_missing_folder_says_how_to_get_the_model(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="Depth-Anything-V2-Large-hf") as info:
        DepthEstimator.from_pretrained(tmp_path / "nope", device="cpu")
    assert "not found" in str(info.value)


def test_incomplete_folder_lists_missing_files(tiny_depth_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_depth_dir / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded: pickles are never read")
    with pytest.raises(UserError, match="model.safetensors") as info:
        DepthEstimator.from_pretrained(tmp_path, device="cpu")
    assert "preprocessor_config.json" in str(info.value)


def test_uncached_hub_id_offline_is_a_user_error() -> None:
    with pytest.raises(UserError, match="local hub cache"):
        DepthEstimator.from_pretrained("threedis-test/no-such-depth-model", device="cpu", local_files_only=True)


def test_unreadable_image_is_a_user_error(estimator: DepthEstimator, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        estimator.estimate(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read"):
        estimator.estimate(tmp_path / "junk.png")


def test_bfloat16_weights_still_give_a_stretched_map(tiny_depth_dir: Path, photo: Image.Image) -> None:
    half = DepthEstimator.from_pretrained(tiny_depth_dir, device="cpu", dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    depth = half.estimate(photo, size=(33, 21))
    assert depth.size == (33, 21) and depth.getextrema() == (0, 255)
