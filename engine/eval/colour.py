"""Is an instance the colour its prompt asks for? OpenCV's 8-bit HSV, and the share of mask pixels in range.

The reference evaluator converts with cv2.cvtColor(..., COLOR_BGR2HSV) and tests
with cv2.inRange; OpenCV is not a dependency here, so the conversion is written out
with OpenCV's own fixed-point arithmetic (12-bit division tables, round half up),
which gives the same H, S and V for every one of the 2^24 colours (checked against
opencv-python 5.1 when it is installed: tests/test_eval_metrics.py).
"""

from __future__ import annotations

import numpy as np

from threedis import UserError
from threedis.engine.eval.protocol import HSV_BANDS

_SHIFT = 12  # OpenCV's hsv_shift
_HALF = 1 << (_SHIFT - 1)
_N = np.arange(256, dtype=np.float64)
# S = diff * 255 / V and H = h * 180 / (6 * diff), both as integer multiply-shift with rounded tables.
_S_DIV = np.concatenate([[0], np.rint((255 << _SHIFT) / _N[1:])]).astype(np.int64)
_H_DIV = np.concatenate([[0], np.rint((180 << _SHIFT) / (6.0 * _N[1:]))]).astype(np.int64)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> int64 HSV [..., 3] with H in 0..179 (half degrees), S and V in 0..255."""
    x = np.asarray(rgb).astype(np.int64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(axis=-1)
    diff = v - x.min(axis=-1)
    s = (diff * _S_DIV[v] + _HALF) >> _SHIFT
    # Which channel is the largest decides the sector: red first, then green (OpenCV's order for ties).
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _H_DIV[diff] + _HALF) >> _SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1)


def in_colour(hsv: np.ndarray, colour: str) -> np.ndarray:
    """Bool [...]: HSV values inside any band of `colour` (bounds inclusive, as cv2.inRange)."""
    bands = HSV_BANDS.get(colour)
    if bands is None:
        raise UserError(f"colour {colour!r} is not one of the protocol's colours ({', '.join(HSV_BANDS)})")
    hit = np.zeros(hsv.shape[:-1], dtype=bool)
    for low, high in bands:
        hit |= np.all((hsv >= np.asarray(low)) & (hsv <= np.asarray(high)), axis=-1)
    return hit


def colour_fraction(rgb: np.ndarray, mask: np.ndarray, colour: str) -> tuple[float, int]:
    """(share of the mask's pixels whose colour is in `colour`'s range, mask pixel count).

    The reference paints everything outside the mask grey 127 first; grey is in no
    band and only mask pixels are counted, so that step cannot change the share and
    only the mask's pixels are converted here. An empty mask gives (0.0, 0).
    """
    inside = np.asarray(mask, dtype=bool)
    count = int(inside.sum())
    if count == 0:
        return 0.0, 0
    hits = int(in_colour(rgb_to_hsv(np.asarray(rgb)[inside]), colour).sum())
    return hits / count, count
