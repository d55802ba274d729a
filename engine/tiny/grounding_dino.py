"""A tiny random-weight Grounding DINO checkpoint (`threedis make-tiny grounding-dino`), written offline.

Why: `threedis eval mig` detects instances with IDEA-Research/grounding-dino-tiny (700 MB
behind the hub). Tests and a newcomer need the same on-disk layout (config.json,
model.safetensors, preprocessor_config.json, a BERT tokenizer) read by the same classes,
with a few hundred thousand weights so a detection costs milliseconds on a CPU. The
architecture is the real one (Swin backbone, BERT text encoder, deformable encoder and
decoder with text fusion), narrower and shallower, at a 64 px input. Its detections are
random: it exercises the code, not the metric.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from threedis.engine.tiny.store import IMAGENET_MEAN, IMAGENET_STD, cached_build, finish_transformers_checkpoint
from threedis.engine.tiny.store import plain_lists, start_folder
from threedis.engine.tiny.text import bert_vocab, corpus, write_bert_tokenizer

__all__ = ["STANDS_IN_FOR", "TINY_GROUNDING_DINO", "TINY_GROUNDING_DINO_VERSION", "tiny_grounding_dino_path",
           "write_tiny_grounding_dino"]

STANDS_IN_FOR = "IDEA-Research/grounding-dino-tiny"
TINY_GROUNDING_DINO_VERSION = 1
_ro = MappingProxyType

_SIZE = 64  # the detector's input side (the real one: 800)
TINY_GROUNDING_DINO: Mapping[str, Any] = _ro({
    # Swin with 4 stages, the last three feeding the detector (as the real out_indices [2, 3, 4]). 2 px patches:
    # the extra fourth level (a stride-2 conv, then GroupNorm) is 2 x 2, not 1 x 1, which GroupNorm refuses.
    "backbone": _ro({"image_size": _SIZE, "patch_size": 2, "embed_dim": 8, "depths": (1, 1, 1, 1),
                     "num_heads": (1, 1, 1, 1), "window_size": 4, "out_indices": (2, 3, 4)}),
    "text": _ro({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                 "max_position_embeddings": 64}),
    # d_model 32: the input projections' GroupNorm has 32 groups. Two decoder layers: its box heads are tied.
    "detector": _ro({"d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "encoder_ffn_dim": 64,
                     "decoder_ffn_dim": 64, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                     "num_queries": 16, "encoder_n_points": 2, "decoder_n_points": 2, "max_text_len": 32}),
    # The real preprocessor_config.json's keys, at the tiny input size.
    "preprocessor": _ro({
        "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True, "format": "coco_detection",
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "image_processor_type": "GroundingDinoImageProcessor",
        "processor_class": "GroundingDinoProcessor", "resample": 2, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": _SIZE, "longest_edge": _SIZE * 5 // 3},
    }),
})


def write_tiny_grounding_dino(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny GroundingDinoForObjectDetection checkpoint with its tokenizer into `path`; returns it.

    Loads with GroundingDinoForObjectDetection / AutoModelForZeroShotObjectDetection and
    AutoTokenizer. Same seed, same bytes; the caller's torch RNG state is left untouched.
    """
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    path = start_folder(path)
    spec = plain_lists(TINY_GROUNDING_DINO)
    vocab = bert_vocab(corpus())
    write_bert_tokenizer(path, vocab)
    config = GroundingDinoConfig(backbone_config=SwinConfig(**spec["backbone"]),
                                 text_config=BertConfig(vocab_size=len(vocab), **spec["text"]), **spec["detector"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config).eval()
    return finish_transformers_checkpoint(path, model, TINY_GROUNDING_DINO["preprocessor"],
                                          TINY_GROUNDING_DINO_VERSION, seed)


def tiny_grounding_dino_path(root: str | os.PathLike[str] | None = None) -> Path:
    """Cached tiny Grounding DINO checkpoint under `root` (default $THREEDIS_CACHE or ~/.cache/threedis)."""
    return cached_build(root, f"tiny-grounding-dino-v{TINY_GROUNDING_DINO_VERSION}", TINY_GROUNDING_DINO_VERSION,
                        write_tiny_grounding_dino)
