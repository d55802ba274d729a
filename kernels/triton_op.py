"""The fused masked-attention kernel as a PyTorch custom op: `torch.ops.threedis.masked_attention`.

Why an op: torch.compile then sees one opaque node with a fake (shape-only)
implementation instead of a Python launcher it cannot trace, so there is no
graph break, and the block table is an ordinary tensor input: a new table
(phase change) is new data, not a recompile. Only tensors and plain numbers
cross the boundary.

`torch.library.custom_op` (not `triton_op`) is used so the op also runs under
Triton's CPU interpreter, where kernels are not `JITFunction`s and
`wrap_triton` refuses them; the kernel stays opaque to Inductor either way.
"""

from __future__ import annotations

import torch

from threedis.kernels import triton_attention


@torch.library.custom_op("threedis::masked_attention", mutates_args=())
def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    member: torch.Tensor,
    kind: torch.Tensor,
    kv_index: torch.Tensor,
    kv_count: torch.Tensor,
    kv_full: torch.Tensor,
    image_bits: int,
    text_bits: int,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    """q, k, v: [B, L, H, D] (any strides) -> contiguous [B, L, H, D]; see triton_attention.launch."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    triton_attention.launch(
        q, k, v, out, member, kind, kv_index, kv_count, kv_full,
        image_bits, text_bits, block_m, block_n, num_warps, num_stages,
    )
    return out


@masked_attention.register_fake
def _masked_attention_fake(q, k, v, member, kind, kv_index, kv_count, kv_full, *numbers):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
