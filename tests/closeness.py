"""Comparisons for outputs that two code paths compute from the same weights (shared by test modules).

Why: a freshly built and a reloaded model hold identical weights, but their tensors
may differ in memory layout or alignment, and CPU kernels (MKL, oneDNN, quanto's int8
matmul) pick different code paths for those; the results then differ by a few units
in the last place (6e-7 was seen on another CPU). So weights are compared exactly,
and outputs within a tolerance that such rounding cannot exceed but a wrong model would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Same state-dict names, dtypes, shapes and values, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name, t in sa.items():
        u = sb[name]
        assert t.dtype == u.dtype and t.shape == u.shape, name
        assert torch.equal(t.cpu(), u.cpu()), name


def assert_images_close(a: Any, b: Any, max_fraction: float = 0.01) -> None:
    """8-bit images from two code paths: at most one grey level apart, on few values.

    A rounding-level difference in the float image moves a value across a rounding
    boundary only when it sits within that difference of one: one level, rarely. A
    different model or input moves most values by many levels.
    """
    pa, pb = np.asarray(a).astype(np.int16), np.asarray(b).astype(np.int16)
    assert pa.shape == pb.shape
    diff = np.abs(pa - pb)
    print(f"image diff: max {diff.max()}, {np.count_nonzero(diff)} of {diff.size} values differ")
    assert diff.max() <= 1 and np.count_nonzero(diff) <= max_fraction * diff.size
