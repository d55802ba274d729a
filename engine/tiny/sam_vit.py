"""A tiny random-weight SAM (ViT) checkpoint (`threedis make-tiny sam-vit`), written offline in a second.

Why: `threedis eval mig` cuts each instance out with facebook/sam-vit-huge (2.5 GB behind
the hub) to test its colour. Tests and a newcomer need the same on-disk layout
(config.json, model.safetensors, preprocessor_config.json) read by the same class, with
a few tens of thousands of weights. The architecture is the real one (ViT image encoder
with windowed and global attention, prompt encoder, two-way mask decoder with three
mask outputs), narrower and shallower, at a 64 px input.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from threedis.engine.tiny.store import IMAGENET_MEAN, IMAGENET_STD, cached_build, finish_transformers_checkpoint
from threedis.engine.tiny.store import plain_lists, start_folder

__all__ = ["STANDS_IN_FOR", "TINY_SAM_VIT", "TINY_SAM_VIT_VERSION", "tiny_sam_vit_path", "write_tiny_sam_vit"]

STANDS_IN_FOR = "facebook/sam-vit-huge"
TINY_SAM_VIT_VERSION = 1
_ro = MappingProxyType

_SIZE = 64  # input side (the real one: 1024); 8 px patches give an 8 x 8 embedding and 32 x 32 low-res masks
TINY_SAM_VIT: Mapping[str, Any] = _ro({
    "vision": _ro({"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": _SIZE,
                   "patch_size": 8, "window_size": 4, "global_attn_indexes": (1,), "output_channels": 16,
                   "mlp_dim": 32, "num_pos_feats": 8}),
    "prompt_encoder": _ro({"hidden_size": 16, "image_size": _SIZE, "patch_size": 8, "mask_input_channels": 4}),
    "mask_decoder": _ro({"hidden_size": 16, "mlp_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "iou_head_hidden_dim": 16}),
    # The real preprocessor_config.json's keys, at the tiny input size.
    "preprocessor": _ro({
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "image_processor_type": "SamImageProcessor",
        "mask_pad_size": {"height": _SIZE // 2, "width": _SIZE // 2}, "mask_size": {"longest_edge": _SIZE // 2},
        "pad_size": {"height": _SIZE, "width": _SIZE}, "processor_class": "SamProcessor", "resample": 2,
        "rescale_factor": 1 / 255, "size": {"longest_edge": _SIZE},
    }),
})


def write_tiny_sam_vit(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny SamModel checkpoint into `path` and return it (SamModel.from_pretrained loads it).

    Same seed, same bytes; the caller's torch RNG state is left untouched.
    """
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    path = start_folder(path)
    spec = plain_lists(TINY_SAM_VIT)
    config = SamConfig(vision_config=SamVisionConfig(**spec["vision"]),
                       prompt_encoder_config=SamPromptEncoderConfig(**spec["prompt_encoder"]),
                       mask_decoder_config=SamMaskDecoderConfig(**spec["mask_decoder"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SamModel(config).eval()
    return finish_transformers_checkpoint(path, model, TINY_SAM_VIT["preprocessor"], TINY_SAM_VIT_VERSION, seed)


def tiny_sam_vit_path(root: str | os.PathLike[str] | None = None) -> Path:
    """Cached tiny SAM (ViT) checkpoint under `root` (default $THREEDIS_CACHE or ~/.cache/threedis)."""
    return cached_build(root, f"tiny-sam-vit-v{TINY_SAM_VIT_VERSION}", TINY_SAM_VIT_VERSION, write_tiny_sam_vit)
