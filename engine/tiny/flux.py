"""A tiny random-weight FLUX.1-Depth-dev checkpoint, written offline in seconds (`threedis make-tiny flux`).

Why: every test of the engine (loading, offload, quantization, attention masks, the
zero-instance equality with diffusers) needs a real diffusers checkpoint, and the
real one is 30+ GB behind a gated hub. This writes one with the exact on-disk
layout of `black-forest-labs/FLUX.1-Depth-dev` (model_index.json naming
FluxControlPipeline, one folder per component, safetensors weights, CLIP BPE and
T5 sentencepiece tokenizers) but with a few hundred thousand random weights.

The tokenizers come from `text` (trained on a built-in English corpus); the text
models' vocabularies match them exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from threedis.engine.tiny.store import (
    MARKER, cached_build, mark_complete, quiet_saves, seeded, start_folder, write_json,
)
from threedis.engine.tiny.text import (
    CLIP_MAX_LENGTH, CLIP_VOCAB, T5_EXTRA_IDS, T5_MAX_LENGTH, T5_VOCAB,
    corpus, write_clip_tokenizer, write_t5_tokenizer,
)

STANDS_IN_FOR = "black-forest-labs/FLUX.1-Depth-dev"
TINY_VERSION = 1
_DIR_NAME = f"tiny-flux-v{TINY_VERSION}"

_ro = MappingProxyType

# Per-component constructor kwargs. Shapes follow FLUX.1-Depth-dev scaled down:
# 16 latent channels packed 2x2 -> 64; noisy + control latents -> 128 in, 64 out;
# 2 heads x 16 with rope axes 4 + 6 + 6 = 16; 4 VAE levels -> vae scale factor 8.
TINY_FLUX: Mapping[str, Mapping[str, Any]] = _ro({
    "transformer": _ro({
        "patch_size": 1, "in_channels": 128, "out_channels": 64,
        "num_layers": 2, "num_single_layers": 2,
        "attention_head_dim": 16, "num_attention_heads": 2,
        "joint_attention_dim": 32, "pooled_projection_dim": 32,
        "guidance_embeds": True, "axes_dims_rope": (4, 6, 6),
    }),
    "vae": _ro({
        "in_channels": 3, "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1,
        "act_fn": "silu", "latent_channels": 16, "norm_num_groups": 4,
        "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
        "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }),
    "text_encoder": _ro({
        "vocab_size": CLIP_VOCAB, "hidden_size": 32, "intermediate_size": 64,
        "projection_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "bos_token_id": CLIP_VOCAB - 2, "eos_token_id": CLIP_VOCAB - 1,
        "pad_token_id": CLIP_VOCAB - 1,
    }),
    "text_encoder_2": _ro({
        "vocab_size": T5_VOCAB, "d_model": 32, "d_kv": 16, "d_ff": 64,
        "num_layers": 2, "num_heads": 2, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }),
    "scheduler": _ro({
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
        "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }),
    "tokenizer": _ro({"vocab_size": CLIP_VOCAB, "model_max_length": CLIP_MAX_LENGTH}),
    "tokenizer_2": _ro({"vocab_size": T5_VOCAB, "model_max_length": T5_MAX_LENGTH,
                        "extra_ids": T5_EXTRA_IDS}),
})

_MODEL_INDEX = {
    "_class_name": "FluxControlPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# -- models ---------------------------------------------------------------------------

def _write_models(path: Path, seed: int) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    seeded(seed, 1)
    FluxTransformer2DModel(**TINY_FLUX["transformer"]).save_pretrained(
        path / "transformer", safe_serialization=True)
    seeded(seed, 2)
    AutoencoderKL(**TINY_FLUX["vae"]).save_pretrained(path / "vae", safe_serialization=True)
    seeded(seed, 3)
    CLIPTextModel(CLIPTextConfig(**TINY_FLUX["text_encoder"])).save_pretrained(
        path / "text_encoder", safe_serialization=True)
    seeded(seed, 4)
    T5EncoderModel(T5Config(**TINY_FLUX["text_encoder_2"])).save_pretrained(
        path / "text_encoder_2", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(**TINY_FLUX["scheduler"]).save_pretrained(path / "scheduler")


# -- public -------------------------------------------------------------------------------

def write_tiny_flux(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write the tiny checkpoint into `path` (created if needed) and return it.

    The same seed gives byte-identical weights. The caller's torch RNG state is
    restored afterwards, so writing never perturbs a test's own randomness.
    """
    import diffusers

    path = start_folder(path)
    lines = corpus()
    write_clip_tokenizer(path / "tokenizer", lines)
    write_t5_tokenizer(path / "tokenizer_2", lines)
    with torch.random.fork_rng(devices=[]), quiet_saves():
        _write_models(path, seed)
    write_json(path / "model_index.json", {**_MODEL_INDEX, "_diffusers_version": diffusers.__version__})
    return mark_complete(path, MARKER, TINY_VERSION, seed)


def is_tiny_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if `path` holds a complete checkpoint written by `write_tiny_flux`."""
    return (Path(path) / MARKER).is_file()


def tiny_flux_path(root: str | os.PathLike[str] | None = None) -> Path:
    """The cached tiny FLUX checkpoint under `root` (default $THREEDIS_CACHE or ~/.cache/threedis)."""
    return cached_build(root, _DIR_NAME, TINY_VERSION, write_tiny_flux)


__all__ = ["MARKER", "STANDS_IN_FOR", "TINY_FLUX", "TINY_VERSION", "is_tiny_checkpoint", "tiny_flux_path",
           "write_tiny_flux"]
