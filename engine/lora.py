"""FLUX LoRAs on the engine's transformer, through diffusers' own LoRA machinery (peft).

diffusers already converts the common key namings (diffusers/peft, kohya, xlabs,
BFL control) to its own, so this module only finds the file, keeps the
transformer's part of it, and tracks the scale of each adapter it added: peft
activates adapters as a set, so adding one must restate the others' scales.
Files are read with safetensors only (never unpickled).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from threedis.engine.checks import check_lora_scale
from threedis.engine.errors import UserError
from threedis.engine.model_paths import lora_file

__all__ = ["load_lora", "lora_file", "set_lora_scale", "unload_loras"]

_SCALES_ATTR = "_threedis_lora_scales"  # adapter name -> scale, kept on the transformer it belongs to
_PREFIX = "transformer."


def _require_peft() -> None:
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        raise UserError("LoRA loading needs peft (and a recent transformers): `pip install peft`")


def _scales(transformer: Any) -> dict[str, float]:
    scales = getattr(transformer, _SCALES_ATTR, None)
    if scales is None:
        scales = {}
        setattr(transformer, _SCALES_ATTR, scales)
    return scales


_FP8 = {torch.float8_e4m3fn, torch.float8_e5m2}


def _compute_dtype(transformer: Any) -> torch.dtype:
    """The dtype the transformer computes in: that of its first floating, non-fp8 parameter
    (fp8 layerwise casting and the quantizers keep norms and embedders in it)."""
    for param in transformer.parameters():
        if param.is_floating_point() and param.dtype not in _FP8:
            return param.dtype
    return torch.bfloat16


def _unfp8_adapters(transformer: Any) -> None:
    """peft stores new LoRA matrices in the base weight's dtype; with fp8 storage (layerwise
    casting upcasts only the base layer) they would be multiplied in fp8, which torch cannot
    do. LoRA matrices are tiny: keep them in the compute dtype."""
    dtype = None
    for name, param in transformer.named_parameters():
        if ".lora_" in name and param.dtype in _FP8:
            dtype = dtype or _compute_dtype(transformer)
            param.data = param.data.to(dtype)


def _activate(transformer: Any) -> None:
    scales = _scales(transformer)
    transformer.set_adapters(list(scales), weights=list(scales.values()))


def load_lora(transformer: Any, path: str | os.PathLike, scale: float = 1.0, adapter_name: str | None = None) -> str:
    """Add a LoRA to `transformer` at `scale` (0 = no effect); earlier LoRAs stay active. Returns its name."""
    import safetensors.torch
    from diffusers.loaders import FluxLoraLoaderMixin

    scale = check_lora_scale(scale)  # before anything loads: NaN or 1e30 would only show as a black image
    _require_peft()
    file = lora_file(path)
    name = adapter_name or file.stem
    if name in _scales(transformer):
        raise UserError(f"a LoRA named {name!r} is already loaded; give another adapter_name")
    try:
        raw = safetensors.torch.load_file(str(file), device="cpu")
        state, alphas = FluxLoraLoaderMixin.lora_state_dict(raw, return_alphas=True)
    except Exception as exc:  # unreadable file or an unknown key naming
        raise UserError(f"cannot read LoRA {file}: {type(exc).__name__}: {exc}") from None
    state = {k: v for k, v in state.items() if k.startswith(_PREFIX)}
    if not any("lora" in k for k in state):
        raise UserError(f"LoRA {file} has no FLUX transformer weights (text-encoder-only LoRAs are not supported)")
    alphas = {k: v for k, v in (alphas or {}).items() if k.startswith(_PREFIX)} or None
    try:
        FluxLoraLoaderMixin.load_lora_into_transformer(state, network_alphas=alphas, transformer=transformer,
                                                       adapter_name=name)
    except (ValueError, RuntimeError, KeyError) as exc:  # shape mismatch: a LoRA for another model
        raise UserError(f"LoRA {file} does not fit this FLUX transformer: {exc}") from None
    _unfp8_adapters(transformer)
    _scales(transformer)[name] = float(scale)
    _activate(transformer)
    return name


def set_lora_scale(transformer: Any, name: str, scale: float) -> None:
    scales = _scales(transformer)
    if name not in scales:
        raise UserError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(scales) or 'none'})")
    scales[name] = check_lora_scale(scale)
    _activate(transformer)


def unload_loras(transformer: Any) -> None:
    """Remove every adapter this module added; the transformer is as loaded again."""
    scales = _scales(transformer)
    if scales:
        transformer.delete_adapters(list(scales))
        scales.clear()
