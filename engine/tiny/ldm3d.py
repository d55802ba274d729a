"""A tiny random-weight LDM3D-4c checkpoint plus stand-ins for the authors' stage-1 files (`threedis make-tiny ldm3d`).

Why: stage-1 tests need the real on-disk shapes of things (a diffusers folder
naming StableDiffusionLDM3DPipeline, a UNet whose block layout has the 7 adapter
layers, a VAE decoding RGB + depth, a CLIP text model, and the two release pickles
`unet_0901.ckpt` and `layout_adapter.ckpt`) without gigabytes of weights. The
UNet keeps SD-1.x's block structure (3 cross-attention down blocks + 1 plain, 1
plain up block + 3 cross-attention) with tiny channels, so `mid_block.attentions.0`
and `up_blocks.{1,2}.attentions.{0,1,2}` exist. The adapter pickle follows the
release's naming rule; its widths follow the tiny UNet (C) and tiny CLIP (D).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from threedis.engine.tiny.flux import TINY_FLUX
from threedis.engine.tiny.store import cached_build, mark_complete, quiet_saves, seeded, start_folder, write_json
from threedis.engine.tiny.text import corpus, write_clip_tokenizer
from threedis.engine.tiny_rules import LDM3D_MARKER

__all__ = ["STANDS_IN_FOR", "TINY_LDM3D", "TINY_LDM3D_VERSION", "tiny_ldm3d_path", "write_tiny_ldm3d"]

STANDS_IN_FOR = "Intel/ldm3d-4c"

TINY_LDM3D_VERSION = 1
MARKER = LDM3D_MARKER  # written last: its presence means the folder is complete
_DIR_NAME = f"tiny-ldm3d-v{TINY_LDM3D_VERSION}"

_ro = MappingProxyType

TINY_LDM3D: Mapping[str, Mapping[str, Any]] = _ro({
    # Adapter widths: C = 64 at mid and up_blocks.1, 32 at up_blocks.2 (8 heads each).
    "unet": _ro({
        "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (16, 32, 64, 64), "layers_per_block": 2,
        "cross_attention_dim": 32, "attention_head_dim": 2, "norm_num_groups": 8,
    }),
    "vae": _ro({
        "in_channels": 4, "out_channels": 4, "latent_channels": 4,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1,
        "act_fn": "silu", "norm_num_groups": 4, "sample_size": 64, "scaling_factor": 0.18215,
    }),
    "text_encoder": TINY_FLUX["text_encoder"],  # CLIP, hidden 32, same BPE vocabulary
    "scheduler": _ro({
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "skip_prk_steps": True, "set_alpha_to_one": False,
        "steps_offset": 1, "prediction_type": "epsilon",
    }),
})

_MODEL_INDEX = {
    "_class_name": "StableDiffusionLDM3DPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _write_models(path: Path, seed: int) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from threedis.engine.stage1.checkpoint import ADAPTER_FILENAME, UNET_FILENAME
    from threedis.engine.stage1.processors import install_processors, make_adapters

    seeded(seed, 11)
    UNet2DConditionModel(**TINY_LDM3D["unet"]).save_pretrained(path / "unet", safe_serialization=True)
    seeded(seed, 12)
    AutoencoderKL(**TINY_LDM3D["vae"]).save_pretrained(path / "vae", safe_serialization=True)
    seeded(seed, 13)
    CLIPTextModel(CLIPTextConfig(**TINY_LDM3D["text_encoder"])).save_pretrained(
        path / "text_encoder", safe_serialization=True)
    PNDMScheduler(**TINY_LDM3D["scheduler"]).save_pretrained(path / "scheduler")

    # Stand-in for the fine-tuned UNet: same config, other weights, a plain pickled state dict.
    seeded(seed, 14)
    finetuned = UNet2DConditionModel(**TINY_LDM3D["unet"])
    torch.save(finetuned.state_dict(), path / UNET_FILENAME)
    # Stand-in for the adapter: the release's keys, default init, gamma made non-zero
    # (zero, the init value, would switch the adapter's contribution off).
    seeded(seed, 15)
    adapters = make_adapters(finetuned)
    for adapter in adapters.values():
        adapter.gamma.data = 0.5 + torch.rand(1)
    procs = install_processors(finetuned, adapters)
    state = {f"{layer}.attn2.processor.{k}": v for layer, p in procs.items() for k, v in p.state_dict().items()}
    torch.save(state, path / ADAPTER_FILENAME)


def write_tiny_ldm3d(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write the tiny checkpoint into `path` (created if needed) and return it.

    Deterministic for a seed; the caller's torch RNG state is restored afterwards.
    """
    import diffusers

    path = start_folder(path, MARKER)
    write_clip_tokenizer(path / "tokenizer", corpus())
    with torch.random.fork_rng(devices=[]), quiet_saves():
        _write_models(path, seed)
    write_json(path / "model_index.json", {**_MODEL_INDEX, "_diffusers_version": diffusers.__version__})
    return mark_complete(path, MARKER, TINY_LDM3D_VERSION, seed)


def tiny_ldm3d_path(root: str | os.PathLike[str] | None = None) -> Path:
    """The cached tiny LDM3D checkpoint under `root` (default $THREEDIS_CACHE or ~/.cache/threedis)."""
    return cached_build(root, _DIR_NAME, TINY_LDM3D_VERSION, write_tiny_ldm3d, marker=MARKER)
