"""One reading of a stage-1 size ("512", "768x512", 512 or (768, 512)) for the API and the CLI.

A module of its own so that the CLI can parse flags without importing torch.
"""

from __future__ import annotations

from typing import Any

from threedis.engine.errors import UserError

__all__ = ["MAX_SIDE", "parse_size"]

MAX_SIDE = 4096  # stage 1 (an SD-1.x UNet) is trained at 512; far larger sizes only exhaust memory


def parse_size(value: Any, name: str = "stage1_size", multiple: int = 8, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """512, "512", "768x512" or (768, 512) -> (width, height); both multiples of `multiple`, at most `max_side`.

    One reading of a size for the API and the CLI: a stage-1 size by default (--stage1-size
    768x512; 8 is the LDM3D VAE factor), a render's with the layout's multiple and side.
    """
    if isinstance(value, str):
        parts = value.lower().replace(" ", "").split("x")
        value = tuple(int(p) if p.isdigit() and len(p) <= 5 else p for p in parts)
        value = value[0] if len(value) == 1 else value
    pair = (value, value) if isinstance(value, int) else value
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and multiple <= v <= max_side and v % multiple == 0
        for v in pair)
    if isinstance(value, bool) or not ok:
        example = "512, or 768x512" if multiple <= 256 else f"{multiple}"
        raise UserError(f"{name} must be a multiple of {multiple} up to {max_side} (e.g. {example} for width x "
                        f"height), got {value!r:.60}")
    return int(pair[0]), int(pair[1])
