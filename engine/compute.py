"""Numbers the runtime computes with, in a module of their own that imports nothing heavy.

The runtime (runtime.py, encoding.py) acts on these and the memory planner (planner.py)
prices them; the runtime also asks the planner whether a render fits, so neither may
import the other for them. No torch here: `threedis plan` answers without importing it.
"""

from __future__ import annotations

__all__ = ["QUANT_COMPUTE_DTYPE_NAME", "T5_MAX_LENGTH", "TEXT_BATCH", "VAE_TILE_PX"]

QUANT_COMPUTE_DTYPE_NAME = "bfloat16"  # torch dtype every non-float weight format computes in (profiles.Weights)
VAE_TILE_PX = 512  # tile side (pixels) of a tiled VAE run; the memory planner prices one tile's activations
T5_MAX_LENGTH = 512  # FLUX's T5 sequence length: every prompt is padded to it before encoding
# Prompts per T5 call: activations stay bounded however many instances a layout has (64 instance
# prompts in one batch would need ~8 GB for T5-XXL alone). The memory planner prices this batch.
TEXT_BATCH = 4
