"""Numbers the runtime computes with, in a module of their own so that the planner can price them.

The runtime (runtime.py) acts on these and the memory planner (planner.py) reads them;
the runtime also asks the planner whether a render fits, so neither may import the other
for them.
"""

from __future__ import annotations

import torch

__all__ = ["QUANT_COMPUTE_DTYPE", "VAE_TILE_PX"]

QUANT_COMPUTE_DTYPE = torch.bfloat16  # compute dtype of every non-float weight format (profiles.Weights)
VAE_TILE_PX = 512  # tile side (pixels) of a tiled VAE run; the memory planner prices one tile's activations
