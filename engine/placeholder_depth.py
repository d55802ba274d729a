"""A procedural depth map drawn from a layout's boxes.

Used by `threedis demo` when stage 1 (layout -> depth) is not available, so the
demo still exercises the whole depth -> image path. It is a stand-in, not the
method: the floor recedes towards the top and each instance is a rounded blob
whose nearness grows with the bottom edge of its box (lower in the frame =
closer to the camera).
"""

from __future__ import annotations

import torch
from PIL import Image

from threedis.engine.layout import Layout


def placeholder_depth(layout: Layout) -> Image.Image:
    """8-bit grey depth map at the layout's size, near = bright (as stage 1 emits)."""
    h, w = layout.height, layout.width
    ys = torch.linspace(0.0, 1.0, h)[:, None].expand(h, w)
    xs = torch.linspace(0.0, 1.0, w)[None, :].expand(h, w)
    depth = 0.15 + 0.35 * ys  # floor: far at the top, nearer at the bottom
    for inst in layout.instances:
        x0, y0, x1, y1 = inst.box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        rx, ry = max((x1 - x0) / 2, 1e-3), max((y1 - y0) / 2, 1e-3)
        # superellipse blob, brightest in the middle, soft edge
        dist = ((xs - cx).abs() / rx) ** 4 + ((ys - cy).abs() / ry) ** 4
        blob = (1.0 - dist).clamp(min=0.0) ** 0.5
        near = 0.55 + 0.4 * y1
        depth = torch.maximum(depth, blob * near)
    pixels = (depth.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.numpy())  # uint8 [H, W] -> mode "L"
