"""FlexAttention backend: the rule as a `mask_mod` over O(L) per-token tables.

The mask is never materialised per call: `create_block_mask` classifies each
(query block, key block) tile as empty / full / partial once per phase change,
and the kernel evaluates the `mask_mod` only inside partial tiles. On CUDA the
call is compiled (a fused kernel); on CPU it runs eagerly, which materialises
scores and is meant for tests and small inputs.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from threedis.kernels.rule import Phases, TokenLayout, query_restrictions

if TYPE_CHECKING:
    from threedis.kernels.block_table import BlockTable

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = create_block_mask = flex_attention = None  # type: ignore[assignment,misc]

BLOCK_SIZE = 128  # FlexAttention's default tile; sequences need not be a multiple of it
_KERNEL_TILE = 128  # the largest tile the fused kernel walks; tables are padded to it
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None when FlexAttention can run this device/dtype, else the reason it cannot."""
    if flex_attention is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
    device = torch.device(device)
    if device.type == "cpu":
        if dtype not in _CPU_DTYPES:
            return f"on CPU only float32/float64 are used (eager, unfused), got {dtype}"
        return None
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "compiling FlexAttention on CUDA needs triton, which is not installed"
        if dtype not in _CUDA_DTYPES:
            return f"on CUDA FlexAttention supports float16/bfloat16/float32, got {dtype}"
        return None
    return f"FlexAttention is not supported on {device.type} devices here"


@functools.cache
def _compiled_flex() -> Callable:
    """The one compiled FlexAttention handle of the process.

    Deliberately process-wide: it holds no per-input state (Dynamo keys compiled
    graphs by input shapes and guards), and a handle per layout would force a
    recompile per layout until Dynamo's recompile limit drops to the unfused path.
    Created lazily because `torch.compile` imports Dynamo (seconds) and CPU never needs it.
    """
    return torch.compile(flex_attention)


def rule_mask_mod(member: torch.Tensor, kind: torch.Tensor, restrict: torch.Tensor) -> Callable:
    """mask_mod for FlexAttention: allowed(q, k) = not restricted(q, kind(k)) or shares an instance.

    member: int64[L] instance bitmask; kind: int32[L] KIND_*; restrict: int32[L] bitmask over key kinds.
    """

    def allowed(b, h, q_idx, kv_idx):
        unrestricted = ((restrict[q_idx] >> kind[kv_idx]) & 1) == 0
        shares = (member[q_idx] & member[kv_idx]) != 0
        return unrestricted | shares

    return allowed


def block_mask(tokens: TokenLayout, phases: Phases, device: torch.device, block: int | None = None) -> "BlockMask":
    """The rule's BlockMask for this layout, built once per (phases, device, L, block) and kept on the layout."""
    device = torch.device(device)
    block = BLOCK_SIZE if block is None else block
    key = ("flex", "block_mask", phases, device, tokens.length, block)
    cached = tokens.cache.get(key)
    if cached is not None:
        return cached
    length = tokens.length
    # Pad the tables to whole tiles (padding: no instance, never restricted) so a fused kernel
    # that evaluates mask_mod on the out-of-range tail of the last tile never reads past the end.
    tile = math.lcm(block, _KERNEL_TILE)
    pad = -length % tile
    member = F.pad(tokens.member.to(device=device, dtype=torch.int64), (0, pad))
    kind = F.pad(tokens.kind.to(device=device, dtype=torch.int32), (0, pad))
    restrict = F.pad(query_restrictions(tokens, phases).to(device=device, dtype=torch.int32), (0, pad))
    mask_mod = rule_mask_mod(member, kind, restrict)
    result = create_block_mask(mask_mod, None, None, length, length, device=device, BLOCK_SIZE=block)
    tokens.cache[key] = result
    return result


def prepare(tokens: TokenLayout, phases: Phases, device: torch.device | str, dtype: torch.dtype) -> None:
    """Build this phase set's BlockMask before the transformer runs (a compiled model then only looks it up)."""
    block_mask(tokens, phases, torch.device(device))


def tiles(tokens: TokenLayout, phases: Phases, device: torch.device | str, dtype: torch.dtype) -> "BlockTable":
    """Which BLOCK_SIZE tiles hold an allowed pair: the tiles the block mask lets FlexAttention compute."""
    from threedis.kernels.block_table import build_block_table

    return build_block_table(tokens, phases, BLOCK_SIZE, BLOCK_SIZE)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: TokenLayout, phases: Phases) -> torch.Tensor:
    """q, k, v: [B, L, H, D]; returns [B, L, H, D]."""
    mask = block_mask(tokens, phases, q.device)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
    if torch.compiler.is_compiling():  # inside a compiled model: traced and fused with it
        out = flex_attention(qt, kt, vt, block_mask=mask)
    elif q.device.type == "cuda":
        out = _compiled_flex()(qt, kt, vt, block_mask=mask)
    else:
        with warnings.catch_warnings():
            # Eager on CPU is intended here; silence torch's "use torch.compile" advice.
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = flex_attention(qt, kt, vt, block_mask=mask)
    return out.transpose(1, 2)  # [B, L, H, D]
