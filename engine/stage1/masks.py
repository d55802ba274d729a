"""Box masks for stage 1: rasterised once per render, resized once per feature grid.

Why this path (pixels -> latent grid -> feature grid, both bilinear): it is the
one the adapter was trained with. Boxes are rasterised at pixel level with floor
at both ends (`floor(W*x0) <= col < floor(W*x1)`), the background ("supplement")
mask is 1 minus the union of the boxes at pixel level, and both are resized to
the latent grid (H/8 x W/8) and from there to each UNet feature grid. The cache
lives on the per-render `BoxMasks` object: every attention call of a render at a
given grid size reuses the same tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["REFINED_ALPHA", "BoxMasks", "GridMasks", "rasterize_boxes", "shader_weights", "to_xxyy"]

REFINED_ALPHA = 10.0  # refined-shader logit per unit of box mask; the global prompt's logit is 1


def rasterize_boxes(boxes: Sequence[Sequence[float]], height: int, width: int) -> torch.Tensor:
    """Boxes (x0, y0, x1, y1), normalised, -> float32 [N, height, width] 0/1 masks."""
    masks = torch.zeros(len(boxes), height, width, dtype=torch.float32)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        r0, r1 = math.floor(height * y0), math.floor(height * y1)
        c0, c1 = math.floor(width * x0), math.floor(width * x1)
        masks[i, max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = 1.0
    return masks


def to_xxyy(boxes: Sequence[Sequence[float]]) -> torch.Tensor:
    """(x0, y0, x1, y1) boxes -> float32 [N, 4] in the adapter's order (x0, x1, y0, y1)."""
    b = torch.tensor([list(map(float, box)) for box in boxes], dtype=torch.float32).view(-1, 4)
    return b[:, [0, 2, 1, 3]]


def shader_weights(inst_masks: torch.Tensor, alpha: float = REFINED_ALPHA) -> torch.Tensor:
    """Refined-shader mixing weights: softmax over [1, alpha * m_1, ..., alpha * m_N] per token.

    inst_masks: [N, L] soft masks -> [N + 1, L] (row 0 weights the global prompt).
    """
    ones = torch.ones_like(inst_masks[:1])
    return torch.cat([ones, alpha * inst_masks], dim=0).float().softmax(dim=0)


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # x: [K, h, w] -> [K, *size]
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


@dataclass
class GridMasks:
    """Everything the processors need at one feature grid (h, w), in the model dtype."""

    grid: tuple[int, int]
    inst: torch.Tensor  # [N, HW] soft instance masks
    background: torch.Tensor  # [HW] soft background (outside every box) mask
    weights: torch.Tensor  # [N + 1, HW, 1] refined-shader weights (global first)
    _allowed: torch.Tensor | None = field(default=None, repr=False)

    @property
    def layout_allowed(self) -> torch.Tensor:
        """bool [HW, HW]: tokens p and q share a phase (a box, or the background).

        A phase contains a token when its resized mask is non-zero there, so tokens on
        a box edge belong to both the box and the background. Built on first use.
        """
        if self._allowed is None:
            phases = (torch.cat([self.inst, self.background[None]], dim=0) > 0).float()  # [N + 1, HW]
            self._allowed = (phases.T @ phases) > 0
        return self._allowed


class BoxMasks:
    """Per-render box masks with a per-grid cache (never shared between renders)."""

    def __init__(self, boxes: Sequence[Sequence[float]], height: int, width: int,
                 device: torch.device | str, dtype: torch.dtype, latent_factor: int = 8,
                 alpha: float = REFINED_ALPHA):
        self.num_instances = len(boxes)
        self.latent_size = (height // latent_factor, width // latent_factor)
        self.dtype = dtype
        self.alpha = alpha
        pixels = rasterize_boxes(boxes, height, width)  # [N, H, W]
        background = 1.0 - pixels.sum(dim=0, keepdim=True).clamp(max=1.0)  # [1, H, W]
        self._latent = _bilinear(torch.cat([pixels, background]), self.latent_size).to(device)
        self._grids: dict[tuple[int, int], GridMasks] = {}

    def grid_for(self, tokens: int) -> tuple[int, int]:
        """The feature grid holding `tokens` image tokens: the latent grid halved k times.

        Each UNet downsampling is a stride-2 conv with padding 1, so sizes halve rounding up.
        """
        h, w = self.latent_size
        while h * w > tokens and (h > 1 or w > 1):
            h, w = -(-h // 2), -(-w // 2)
        if h * w != tokens:
            raise ValueError(f"{tokens} image tokens match no feature grid of the latent {self.latent_size}")
        return h, w

    def at(self, tokens: int) -> GridMasks:
        """The masks for an attention call over `tokens` image tokens (cached per grid)."""
        grid = self.grid_for(tokens)
        cached = self._grids.get(grid)
        if cached is None:
            resized = _bilinear(self._latent, grid).flatten(1)  # [N + 1, HW] float32
            inst, background = resized[:-1], resized[-1]
            weights = shader_weights(inst, self.alpha)[..., None]
            cached = GridMasks(grid, inst.to(self.dtype), background.to(self.dtype), weights.to(self.dtype))
            self._grids[grid] = cached
        return cached
