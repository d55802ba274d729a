"""A tiny random-weight Depth Anything V2 checkpoint, written offline in a second (`threedis make-tiny depth`).

Why: the depth estimator loads a real transformers checkpoint
(`depth-anything/Depth-Anything-V2-Large-hf`, hundreds of MB behind the hub). Tests need
the same on-disk layout (config.json, model.safetensors, preprocessor_config.json) read
by the same Auto classes, but with a few thousand weights so a forward pass costs
milliseconds on a CPU. The architecture is the real one (Dinov2 backbone + DPT-style
head), only narrower, shallower and at a 56 px input.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from threedis.engine.tiny.store import IMAGENET_MEAN, IMAGENET_STD, cached_build, finish_transformers_checkpoint
from threedis.engine.tiny.store import plain_lists, start_folder

__all__ = ["STANDS_IN_FOR", "TINY_DEPTH_ANYTHING", "TINY_DEPTH_VERSION", "tiny_depth_anything_path",
           "write_tiny_depth_anything"]

STANDS_IN_FOR = "depth-anything/Depth-Anything-V2-Large-hf"
TINY_DEPTH_VERSION = 1
_ro = MappingProxyType

# A 4-layer Dinov2 (patch 14) whose 4 outputs feed the reassemble/fusion neck, as in the real
# model (which taps layers 5, 12, 18, 24 of a 24-layer ViT-L).
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
        "ensure_multiple_of": 14, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
        "image_processor_type": "DPTImageProcessor", "keep_aspect_ratio": True, "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": _DA_SIZE, "width": _DA_SIZE}, "size_divisor": None,
    }),
})


def write_tiny_depth_anything(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny DepthAnythingForDepthEstimation checkpoint into `path` and return it.

    Loads with AutoImageProcessor + AutoModelForDepthEstimation. Same seed, same bytes;
    the caller's torch RNG state is left untouched.
    """
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    path = start_folder(path)
    spec = plain_lists(TINY_DEPTH_ANYTHING)
    config = DepthAnythingConfig(backbone_config=Dinov2Config(**spec["backbone"]), **spec["head"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(config).eval()
    return finish_transformers_checkpoint(path, model, TINY_DEPTH_ANYTHING["preprocessor"], TINY_DEPTH_VERSION, seed)


def tiny_depth_anything_path(root: str | os.PathLike[str] | None = None) -> Path:
    """Cached tiny depth checkpoint under `root` (default $THREEDIS_CACHE or ~/.cache/threedis)."""
    return cached_build(root, f"tiny-depth-anything-v{TINY_DEPTH_VERSION}", TINY_DEPTH_VERSION,
                        write_tiny_depth_anything)
