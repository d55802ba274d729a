"""A stand-in for SAM2 in tests: masks that are visibly not the boxes, and a record of every call."""

from __future__ import annotations

import torch


class LeftHalfMasker:
    """Stub SAM: the left half of each pixel box, recording every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, int], list[tuple[int, ...]]]] = []

    def masks(self, image, boxes_px):
        self.calls.append((image.size, [tuple(b) for b in boxes_px]))
        out = []
        for x0, y0, x1, y1 in boxes_px:
            m = torch.zeros(image.size[1], image.size[0], dtype=torch.bool)
            m[y0:y1, x0:(x0 + x1) // 2] = True
            out.append(m)
        return out
