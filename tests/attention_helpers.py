"""What the attention tests share: a float64 masked-softmax reference, its tolerance check, random q/k/v.

Why one module: tests/test_backends.py and tests/test_triton_attention.py check every
backend against the same reference with the same rule (flash-attention's): a backend
may be at most ~2x further from the float64 result than plain PyTorch at the input
precision, plus a small absolute floor. pytest puts this folder on sys.path (tests/
has no __init__.py), so test modules import it as `attention_helpers`.
"""

from __future__ import annotations

import math

import torch

# Absolute floor per input dtype, on top of 2x PyTorch's own error.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d), masked) V in plain PyTorch at `dtype`; q, k, v: [B, L, H, D], allowed: [L, L]."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])  # [B, H, L, L]
    if allowed is not None:
        scores = scores.masked_fill(~allowed.to(q.device), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)  # [B, L, H, D]


def assert_close_to_reference(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              allowed: torch.Tensor | None, label: str = "") -> None:
    """`out` within 2x PyTorch's own error (at q's dtype) of the float64 reference, plus ATOL; prints the worst spot."""
    ref = reference(q, k, v, allowed)
    torch_err = (reference(q, k, v, allowed, dtype=q.dtype).double() - ref).abs().max().item()
    assert out.shape == q.shape and out.dtype == q.dtype, f"{label}: got {tuple(out.shape)} {out.dtype}"
    nans = int(torch.isnan(out).sum())
    assert nans == 0, f"{label}: {nans} output elements are NaN (never written?)"
    diff = (out.double() - ref).abs()
    err = diff.max().item()
    bound = 2 * torch_err + ATOL[q.dtype]
    where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() else ()
    print(f"{label}: error {err:.3g} at {where}, plain PyTorch error {torch_err:.3g}, bound {bound:.3g}")
    assert err <= bound, f"{label}: error {err:.3g} exceeds {bound:.3g} (worst at {where})"


def make_qkv(batch: int, length: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
             seed: int = 0, packed: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random non-contiguous q, k, v [B, L, H, D], laid out as diffusers passes them.

    packed: views of one fused [B, L, 3, H, D] projection; else head-major [B, H, L, D]
    storage seen as [B, L, H, D]. Drawn in float64 on the CPU, so values do not depend on the device.
    """
    gen = torch.Generator().manual_seed(seed)
    if packed:
        qkv = torch.randn(batch, length, 3, heads, dim, generator=gen, dtype=torch.float64).to(device, dtype)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64).to(device, dtype)
               .transpose(1, 2) for _ in "qkv")
    return q, k, v
