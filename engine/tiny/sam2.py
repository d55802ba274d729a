"""A tiny random-weight SAM2 checkpoint, written offline in a second (`threedis make-tiny sam2`).

Why: the mask enhancer loads a real transformers checkpoint (`facebook/sam2.1-hiera-large`,
hundreds of MB behind the hub). Tests need the same on-disk layout (config.json,
model.safetensors, preprocessor_config.json) read by the same classes, but with a few
thousand weights so a forward pass costs milliseconds on a CPU. The architecture is the
real one (Hiera backbone + FPN + SAM2 prompt encoder and mask decoder), only narrower,
shallower and at a 64 px input.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from threedis.engine.tiny.store import IMAGENET_MEAN, IMAGENET_STD, cached_build, finish_transformers_checkpoint
from threedis.engine.tiny.store import plain_lists, start_folder

__all__ = ["STANDS_IN_FOR", "TINY_SAM2", "TINY_SAM2_VERSION", "tiny_sam2_path", "write_tiny_sam2"]

STANDS_IN_FOR = "facebook/sam2.1-hiera-large"
TINY_SAM2_VERSION = 1
_ro = MappingProxyType

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
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
        "image_processor_type": "Sam2ImageProcessor", "processor_class": "Sam2Processor",
        "mask_size": {"height": _SAM_SIZE // 4, "width": _SAM_SIZE // 4}, "resample": 2,
        "rescale_factor": 1 / 255, "size": {"height": _SAM_SIZE, "width": _SAM_SIZE},
    }),
})


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

    path = start_folder(path)
    spec = plain_lists(TINY_SAM2)
    config = Sam2Config(
        vision_config=Sam2VisionConfig(backbone_config=Sam2HieraDetConfig(**spec["backbone"]), **spec["vision"]),
        prompt_encoder_config=Sam2PromptEncoderConfig(**spec["prompt_encoder"]),
        mask_decoder_config=Sam2MaskDecoderConfig(**spec["mask_decoder"]),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam2Model(config).eval()
    return finish_transformers_checkpoint(path, model, TINY_SAM2["preprocessor"], TINY_SAM2_VERSION, seed)


def tiny_sam2_path(root: str | os.PathLike[str] | None = None) -> Path:
    """Cached tiny SAM2 checkpoint under `root` (default $THREEDIS_CACHE or ~/.cache/threedis)."""
    return cached_build(root, f"tiny-sam2-v{TINY_SAM2_VERSION}", TINY_SAM2_VERSION, write_tiny_sam2)
