"""Reference backend: the dense L x L allowed-matrix handed to PyTorch's SDPA.

Simple and always available, but O(L^2) memory for the mask and it rules out
the flash kernels of SDPA. It is the yardstick the other backends are tested
against, and the fallback when nothing faster runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from threedis.kernels.rule import Phases, TokenLayout, dense_allowed


def available(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """SDPA runs on every device and floating dtype torch supports."""
    if not dtype.is_floating_point:
        return f"needs a floating-point dtype, got {dtype}"
    return None


def dense_mask(tokens: TokenLayout, phases: Phases, device: torch.device) -> torch.Tensor:
    """BoolTensor[L, L] on `device`, built once per (phases, device) and kept on the layout."""
    key = ("sdpa", "dense", phases, torch.device(device))
    mask = tokens.cache.get(key)
    if mask is None:
        mask = dense_allowed(tokens, phases).to(device)
        tokens.cache[key] = mask
    return mask


def prepare(tokens: TokenLayout, phases: Phases, device: torch.device | str, dtype: torch.dtype) -> None:
    """Build this phase set's mask before the transformer runs (a compiled model then only looks it up)."""
    dense_mask(tokens, phases, torch.device(device))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: TokenLayout, phases: Phases) -> torch.Tensor:
    """q, k, v: [B, L, H, D]; returns [B, L, H, D]."""
    mask = dense_mask(tokens, phases, q.device)  # [L, L], broadcast over B and H
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
