"""One reading of a stage-1 size ("512", "768x512", 512 or (768, 512)) for the API and the CLI.

A module of its own so that the CLI can parse flags without importing torch.
"""

from __future__ import annotations

from typing import Any

from threedis.engine.errors import UserError

__all__ = ["MAX_SIDE", "parse_size"]

MAX_SIDE = 4096  # stage 1 (an SD-1.x UNet) is trained at 512; far larger sizes only exhaust memory


def parse_size(value: Any, name: str = "stage1_size") -> tuple[int, int]:
    """512, "512", "768x512" or (768, 512) -> (width, height); both multiples of 8 (the LDM3D VAE factor).

    One reading of a stage-1 size for the API and the CLI (--stage1-size 768x512).
    """
    if isinstance(value, str):
        parts = value.lower().replace(" ", "").split("x")
        value = tuple(int(p) if p.isdigit() and len(p) <= 5 else p for p in parts)
        value = value[0] if len(value) == 1 else value
    pair = (value, value) if isinstance(value, int) else value
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= MAX_SIDE and v % 8 == 0 for v in pair)
    if isinstance(value, bool) or not ok:
        raise UserError(f"{name} must be a multiple of 8 up to {MAX_SIDE} (e.g. 512, or 768x512 for width x height), "
                        f"got {value!r:.60}")
    return int(pair[0]), int(pair[1])
