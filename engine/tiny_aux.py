"""Tiny random-weight Depth Anything V2 and SAM2 checkpoints, written offline in a second.

Why: the depth estimator and the mask enhancer load real transformers checkpoints
(`depth-anything/Depth-Anything-V2-Large-hf`, `facebook/sam2.1-hiera-large`), which are
hundreds of MB behind the hub. Tests need the same on-disk layout (config.json,
model.safetensors, preprocessor_config.json) read by the same Auto classes, but with
a few thousand weights so a forward pass costs milliseconds on a CPU.

The architectures are the real ones (Dinov2 backbone + DPT-style head; Hiera backbone
+ FPN + SAM2 prompt encoder and mask decoder), only narrower, shallower and at a small
input size (56 px for depth, 64 px for SAM2).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

# Shared with the tiny FLUX writer so all tiny checkpoints live in one cache and mark
# completeness the same way (a marker file written last).
from threedis.engine.tiny import MARKER, cached_build, quiet_saves, write_json

__all__ = [
    "TINY_AUX_VERSION",
    "TINY_DEPTH_ANYTHING",
    "TINY_SAM2",
    "tiny_depth_anything_path",
    "tiny_sam2_path",
    "write_tiny_depth_anything",
    "write_tiny_sam2",
]

TINY_AUX_VERSION = 1
_ro = MappingProxyType

_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]

# Depth Anything V2: a 4-layer Dinov2 (patch 14) whose 4 outputs feed the reassemble/fusion
# neck, as in the real model (which taps layers 5, 12, 18, 24 of a 24-layer ViT-L).
_DA_SIZE = 56  # 4 x 4 patches of 14 px
TINY_DEPTH_ANYTHING: Mapping[str, Any] = _ro({
    "backbone": _ro({
        "image_size": _DA_SIZE, "patch_size": 14, "hidden_size": 16, "num_attention_heads": 2,
        "num_hidden_layers": 4, "mlp_ratio": 2, "out_indices": (1, 2, 3, 4),
        "reshape_hidden_states": False,
    }),
    "head": _ro({
        "patch_size": 14, "reassemble_hidden_size": 16, "neck_hidden_sizes": (4, 8, 16, 32),
        "fusion_hidden_size": 8, "head_hidden_size": 4, "depth_estimation_type": "relative",
    }),
    # Same keys as the real preprocessor_config.json (keep aspect, multiple of 14, bicubic).
    "preprocessor": _ro({
        "do_normalize": True, "do_pad": False, "do_rescale": True, "do_resize": True,
        "ensure_multiple_of": 14, "image_mean": _IMAGENET_MEAN, "image_std": _IMAGENET_STD,
        "image_processor_type": "DPTImageProcessor", "keep_aspect_ratio": True, "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": _DA_SIZE, "width": _DA_SIZE}, "size_divisor": None,
    }),
})

# SAM2: a 4-stage Hiera (5 blocks, one global-attention block that is not a pooling block),
# FPN of width 32, prompt encoder / mask decoder of width 32. Low-res masks are 16 x 16.
_SAM_SIZE = 64
TINY_SAM2: Mapping[str, Any] = _ro({
    "backbone": _ro({
        "hidden_size": 8, "num_attention_heads": 1, "image_size": (_SAM_SIZE, _SAM_SIZE),
        "blocks_per_stage": (1, 1, 2, 1), "embed_dim_per_stage": (8, 16, 32, 64),
        "num_attention_heads_per_stage": (1, 1, 2, 2), "window_size_per_stage": (4, 4, 4, 2),
        "global_attention_blocks": (3,), "window_positional_embedding_background_size": (2, 2),
    }),
    "vision": _ro({
        "backbone_channel_list": (64, 32, 16, 8), "fpn_hidden_size": 32,
        "backbone_feature_sizes": tuple((_SAM_SIZE // s, _SAM_SIZE // s) for s in (4, 8, 16)),
    }),
    "prompt_encoder": _ro({"hidden_size": 32, "image_size": _SAM_SIZE, "patch_size": 16, "mask_input_channels": 4}),
    "mask_decoder": _ro({"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32}),
    # Written by hand: Sam2ImageProcessor needs torchvision to be instantiated, and only its
    # config file (the keys the real checkpoint has) is needed on disk.
    "preprocessor": _ro({
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": _IMAGENET_MEAN, "image_std": _IMAGENET_STD,
        "image_processor_type": "Sam2ImageProcessor", "processor_class": "Sam2Processor",
        "mask_size": {"height": _SAM_SIZE // 4, "width": _SAM_SIZE // 4}, "resample": 2,
        "rescale_factor": 1 / 255, "size": {"height": _SAM_SIZE, "width": _SAM_SIZE},
    }),
})


def _lists(value: Any) -> Any:
    """Config values as plain lists/dicts: transformers' strict configs reject tuples in some fields."""
    if isinstance(value, Mapping):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_lists(v) for v in value]
    return value


def _finish(path: Path, model: Any, preprocessor: Mapping[str, Any], seed: int) -> Path:
    with quiet_saves():
        model.save_pretrained(path, safe_serialization=True)
    write_json(path / "preprocessor_config.json", _lists(preprocessor))
    write_json(path / MARKER, {"version": TINY_AUX_VERSION, "seed": seed})  # last: marks completeness
    return path


def write_tiny_depth_anything(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny DepthAnythingForDepthEstimation checkpoint into `path` and return it.

    Loads with AutoImageProcessor + AutoModelForDepthEstimation. Same seed, same bytes;
    the caller's torch RNG state is left untouched.
    """
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).unlink(missing_ok=True)
    spec = _lists(TINY_DEPTH_ANYTHING)
    config = DepthAnythingConfig(backbone_config=Dinov2Config(**spec["backbone"]), **spec["head"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(config).eval()
    return _finish(path, model, TINY_DEPTH_ANYTHING["preprocessor"], seed)


def write_tiny_sam2(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny Sam2Model checkpoint into `path` and return it.

    Loads with Sam2Model.from_pretrained (and AutoModel). Same seed, same bytes.
    """
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2Model,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).unlink(missing_ok=True)
    spec = _lists(TINY_SAM2)
    config = Sam2Config(
        vision_config=Sam2VisionConfig(backbone_config=Sam2HieraDetConfig(**spec["backbone"]), **spec["vision"]),
        prompt_encoder_config=Sam2PromptEncoderConfig(**spec["prompt_encoder"]),
        mask_decoder_config=Sam2MaskDecoderConfig(**spec["mask_decoder"]),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam2Model(config).eval()
    return _finish(path, model, TINY_SAM2["preprocessor"], seed)


def _cached(root: str | os.PathLike[str] | None, name: str, writer: Callable[[Path], Path]) -> Path:
    return cached_build(root, f"{name}-v{TINY_AUX_VERSION}", TINY_AUX_VERSION, writer)


def tiny_depth_anything_path(root: str | os.PathLike[str] | None = None) -> Path:
    """Cached tiny depth checkpoint under `root` (default $THREEDIS_CACHE or ~/.cache/threedis)."""
    return _cached(root, "tiny-depth-anything", write_tiny_depth_anything)


def tiny_sam2_path(root: str | os.PathLike[str] | None = None) -> Path:
    """Cached tiny SAM2 checkpoint under `root` (default $THREEDIS_CACHE or ~/.cache/threedis)."""
    return _cached(root, "tiny-sam2", write_tiny_sam2)
