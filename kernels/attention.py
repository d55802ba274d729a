"""One entry point for FLUX's masked joint attention, with backends behind a small registry.

Backends are modules named in `BACKENDS`, imported only when asked for, so a
missing Triton (or an old torch without FlexAttention) makes that backend
"unavailable" rather than breaking the import. Each backend module defines
`attention(q, k, v, tokens, phases)` and `available(device, dtype) -> str | None`.

`auto` picks, in order, on CUDA: the fused Triton kernel (never builds an L x L
mask), FlexAttention (block-sparse from the O(L) rule), and the dense-mask SDPA
reference, which always works. Elsewhere (CPU) it picks SDPA with a dense mask:
FlexAttention only fuses under torch.compile on GPUs, and eager it is slower.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch
import torch.nn.functional as F

from threedis.kernels.rule import Phases, RuleError, TokenLayout, concrete_device
from threedis.kernels.backend_order import auto_order, auto_reason

log = logging.getLogger("threedis.kernels")

BACKENDS: dict[str, str] = {
    "sdpa": "threedis.kernels.sdpa_backend",
    "flex": "threedis.kernels.flex_backend",
    "triton": "threedis.kernels.triton_attention",
}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, why it cannot be imported)."""
    path = BACKENDS[name]
    try:
        module = importlib.import_module(path)
    except ImportError as exc:
        return None, f"cannot import {path} ({exc})"
    if not callable(getattr(module, "attention", None)) or not callable(getattr(module, "available", None)):
        return None, f"{path} does not define attention() and available()"
    return module, None


def _unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    module, reason = _load(name)
    if module is None:
        return reason
    return module.available(device, dtype)


def select_backend(
    device: torch.device | str, dtype: torch.dtype, requested: str = "auto"
) -> tuple[str, str]:
    """Resolve `requested` ("auto" or a name in BACKENDS) to (backend name, human-readable reason).

    Raises RuleError for an unknown name or for a named backend that cannot run here.
    """
    device = torch.device(device)
    where = f"{device.type} / {str(dtype).removeprefix('torch.')}"
    if requested != "auto" and requested not in BACKENDS:
        valid = ", ".join(["auto", *BACKENDS])
        raise RuleError(f"unknown attention backend {requested!r}; choose one of: {valid}")
    if requested != "auto":
        reason = _unavailable_reason(requested, device, dtype)
        if reason is not None:
            raise RuleError(
                f"attention backend {requested!r} is unavailable on {where}: {reason}. "
                f"Use backend='auto' to pick one that works."
            )
        choice = (requested, f"requested explicitly ({where})")
    else:
        skipped = []
        for name in auto_order(device.type):
            if name == "triton" and device.type != "cuda":
                skipped.append("triton: needs a CUDA device")
                continue
            reason = _unavailable_reason(name, device, dtype)
            if reason is None:
                choice = (name, auto_reason(device.type, str(dtype).removeprefix("torch."), name, skipped))
                break
            skipped.append(f"{name}: {reason}")
        else:  # pragma: no cover - sdpa is always available
            raise RuleError(f"no attention backend works on {where}: " + "; ".join(skipped))
    log.debug("attention backend %s: %s", *choice)
    return choice


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: TokenLayout | None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise RuleError(
            f"q, k, v must be [B, L, H, D] with matching B, L, H; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if tokens is not None and q.shape[1] != tokens.length:
        h, w = tokens.grid
        raise RuleError(
            f"sequence length mismatch: attention got L={q.shape[1]} tokens but the token layout describes "
            f"{tokens.length} ({tokens.num_instances + 1} text chunks of {tokens.chunk} + {h}x{w} image tokens). "
            f"Likely cause: the text was encoded with a different chunk size or instance count, the image size "
            f"does not match the layout grid, or phases were passed after the text was cut to the global chunk "
            f"(after the hard-control window pass phases=None)."
        )


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked joint attention, exactly what diffusers' native backend computes."""
    # q, k, v: [B, L, H, D] -> SDPA wants [B, H, L, D]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # [B, L, H, D]


def _resolve(tokens: TokenLayout, device: torch.device, dtype: torch.dtype, requested: str) -> ModuleType:
    """Backend module for this call; the choice is memoised on the layout, not the process.

    The module itself is memoised (not its name) so a warm call is one dict lookup:
    torch.compile traces that, whereas importlib inside the graph is a graph break.
    """
    key = ("select", requested, device, dtype)
    module = tokens.cache.get(key)
    if module is None:
        name, _ = select_backend(device, dtype, requested)
        module, reason = _load(name)
        assert module is not None, reason  # select_backend only returns loadable backends
        tokens.cache[key] = module
    return module


def prepare_attention(
    tokens: TokenLayout,
    phases: Phases | None,
    device: torch.device | str,
    dtype: torch.dtype,
    backend: str = "auto",
) -> None:
    """Warm the layout's caches for one phase set before the transformer runs (call on each phase change).

    Picks the backend and lets it build its tables (a backend may define
    `prepare(tokens, phases, device, dtype)`), so the attention calls inside the
    transformer only look things up: that is what lets torch.compile trace the
    whole model without a graph break. Optional in eager mode: calls build lazily.
    """
    if phases is None or not phases.any:
        return
    device = concrete_device(device)
    module = _resolve(tokens, device, dtype, backend)
    hook = getattr(module, "prepare", None)
    if callable(hook):
        hook(tokens, phases, device, dtype)


def attention_sparsity(
    tokens: TokenLayout,
    phases: Phases | None,
    device: torch.device | str,
    dtype: torch.dtype,
    backend: str = "auto",
) -> dict[str, float | int | str]:
    """What one phase set costs the chosen backend, for the profiler: exact density of
    allowed pairs and the fraction of tiles the backend computes.

    A backend that skips tiles without an allowed pair says which through its
    `tiles(tokens, phases, device, dtype) -> BlockTable` (triton: the table its calls
    use; flex: its block mask's tiles); one without (sdpa) computes every pair.
    O(L) work; no L x L matrix.
    """
    from threedis.kernels.block_table import density

    if phases is None or not phases.any:
        return {"density": 1.0, "tile_fraction": 1.0}
    device = concrete_device(device)
    module = _resolve(tokens, device, dtype, backend)
    out: dict[str, float | int | str] = {"density": round(density(tokens, phases), 6)}
    tiles = getattr(module, "tiles", None)  # backends that skip tiles say which; the others compute all
    if not callable(tiles):
        out.update(tile_fraction=1.0)
        return out
    table = tiles(tokens, phases, device, dtype)
    out.update(tile_fraction=round(table.tile_fraction, 6), mask_free_fraction=round(table.full_fraction, 6),
               tile=f"{table.block_m}x{table.block_n}")
    return out


def masked_joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens: TokenLayout | None,
    phases: Phases | None,
    backend: str = "auto",
) -> torch.Tensor:
    """Joint attention under the 3DIS rule (SPEC section 3).

    q, k, v: [B, L, H, D] (diffusers layout, views are fine); returns [B, L, H, D].
    tokens or phases None means plain attention (e.g. after the hard-control window,
    where the text was cut and the layout no longer describes the sequence).
    """
    if backend != "auto" and backend not in BACKENDS:
        select_backend(q.device, q.dtype, backend)  # raises the unknown-name error
    if tokens is None or phases is None:
        _check_shapes(q, k, v, None)
        return plain_attention(q, k, v)
    _check_shapes(q, k, v, tokens)
    if not phases.any:
        return plain_attention(q, k, v)  # every switch off: the rule allows every pair
    module = _resolve(tokens, q.device, q.dtype, backend)
    return module.attention(q, k, v, tokens, phases)
