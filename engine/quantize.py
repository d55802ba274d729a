"""Weight quantization of the FLUX transformer and the T5 encoder, one small handler per scheme.

Why: the bf16 transformer (~24 GB) and T5-XXL (~9.5 GB) do not fit a 16 GB desktop.
Each scheme is a handler with three steps (gpt-fast style), so the same module
swap serves both a fresh quantization and a reload from the quantized-weight cache
(threedis.engine.quant_cache):

    quantize(model, cfg)  real float weights -> quantized modules, in place
    convert(model, cfg)   a `meta` skeleton -> the same module classes, no data
    load(model, tensors)  assign serialized tensors (assign=True, never a float copy)

The serialized form of a quantized model is simply its `state_dict()`; every
library here writes its quantization state into it (bitsandbytes' packed
QuantState, quanto's `weight._data`/`_scale`, fp8 tensors).

Schemes (the `weights` strings of a profile):
    bf16 | fp16 | fp32     plain dtype, nothing quantized
    fp8                    fp8 e4m3 storage, compute dtype upcast per layer (diffusers layerwise casting)
    int8                   bitsandbytes LLM.int8 (Linear8bitLt, threshold 6.0)
    nf4                    bitsandbytes 4-bit NF4, blocksize 64, double-quantized statistics
    quanto-int8|int4|fp8   optimum-quanto weight-only qint8 / qint4 / qfloat8 (+ freeze)

After apply_quantization move a model with `.to(device)` only: `.to(dtype)` would
cast packed integer or fp8 storage to floats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterator, Mapping, MutableMapping, Protocol

import torch
from torch import nn

from threedis.engine.errors import UserError

__all__ = [
    "PLAIN_SCHEMES",
    "QUANT_SCHEMES",
    "SCHEMES",
    "QuantConfig",
    "apply_quantization",
    "convert_skeleton",
    "default_skip_patterns",
    "load_quantized_state",
    "quantized_module_names",
    "scheme_library",
]

PLAIN_SCHEMES: Mapping[str, torch.dtype] = {
    "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
}
QUANT_SCHEMES = ("fp8", "int8", "nf4", "quanto-int8", "quanto-int4", "quanto-fp8")
SCHEMES = (*PLAIN_SCHEMES, *QUANT_SCHEMES)

_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Kept in the compute dtype by every scheme: the input/output projections and the
# embedders of FLUX (small, and the whole image passes through them), T5's token and
# relative-position embeddings. Regexes, searched in a module's name or any ancestor's.
_KEEP_HIGH_PRECISION = (
    r"^x_embedder$", r"^context_embedder$", r"^proj_out$", r"^norm_out$",
    r"^time_text_embed$", r"pos_embed",                                  # FLUX
    r"^shared$", r"embed_tokens$", r"relative_attention_bias$",          # T5
)
_NF4_BLOCKSIZE = 64
_INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold, the transformers/diffusers default


@dataclass(frozen=True)
class QuantConfig:
    """How to store a model's weights.

    compute_dtype: dtype of activations and of every non-quantized weight; None means
        the scheme's own dtype for plain schemes, else bf16.
    skip: regexes of module names kept unquantized (searched in the module's name and
        its ancestors'); None means `default_skip_patterns(model, scheme)`.
    """

    scheme: str
    compute_dtype: torch.dtype | None = None
    skip: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise UserError(f"unknown weights format {self.scheme!r}; use one of: {', '.join(SCHEMES)}")
        plain = PLAIN_SCHEMES.get(self.scheme)
        if self.compute_dtype is None:
            object.__setattr__(self, "compute_dtype", plain or torch.bfloat16)
        elif self.compute_dtype not in _COMPUTE_DTYPES:
            raise UserError(f"compute dtype {self.compute_dtype} is not one of bf16, fp16, fp32")
        elif plain is not None and self.compute_dtype != plain:
            raise UserError(f"weights {self.scheme!r} compute in {plain}, not {self.compute_dtype}; "
                            f"drop the compute dtype or pick weights matching it")
        if self.skip is not None:
            object.__setattr__(self, "skip", tuple(self.skip))
            for pattern in self.skip:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise UserError(f"skip pattern {pattern!r} is not a valid regex: {exc}") from None

    @property
    def is_plain(self) -> bool:
        return self.scheme in PLAIN_SCHEMES

    def resolved(self, model: nn.Module) -> "QuantConfig":
        """This config with `skip` filled in for `model` (what the cache key records)."""
        if self.skip is not None:
            return self
        return replace(self, skip=default_skip_patterns(model, self.scheme))


def default_skip_patterns(model: nn.Module, scheme: str) -> tuple[str, ...]:
    """Modules kept in high precision, as the libraries recommend for FLUX and T5.

    fp8 layerwise casting also keeps diffusers' defaults (norm layers, including FLUX's
    AdaLN modulation linears `norm1.linear`, `norm.linear`) and the model's own
    `_skip_layerwise_casting_patterns`, as `ModelMixin.enable_layerwise_casting` does;
    the integer schemes quantize the modulation linears (~3.2B of FLUX's 11.9B params),
    as diffusers' bitsandbytes and quanto integrations do. A model's `_keep_in_fp32_modules`
    (T5's `wo`, ~1B of T5-XXL's 4.8B params) stay in the compute dtype, as transformers does.
    """
    patterns = list(_KEEP_HIGH_PRECISION)
    # transformers never quantizes these (T5: `wo`); T5's FF also casts its activations to
    # wo.weight.dtype, which would be uint8 for NF4 and fp8 for layerwise casting.
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or ()
    patterns += [rf"(^|\.){re.escape(name)}$" for name in sorted(keep_fp32)]
    if scheme == "fp8":
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        patterns += DEFAULT_SKIP_MODULES_PATTERN
        patterns += getattr(model, "_skip_layerwise_casting_patterns", None) or ()
    return tuple(dict.fromkeys(patterns))


def scheme_library(scheme: str) -> tuple[str, str] | None:
    """(package, version) whose serialized format a scheme depends on (part of the cache key)."""
    import importlib.metadata as md

    package = {"int8": "bitsandbytes", "nf4": "bitsandbytes", "fp8": "diffusers"}.get(
        scheme, "optimum-quanto" if scheme.startswith("quanto-") else None)
    return None if package is None else (package, md.version(package))


# ------------------------------------------------------------------ module selection


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    parts = name.split(".")
    prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return any(re.search(p, prefix) for prefix in prefixes for p in patterns)


def _targets(model: nn.Module, cfg: QuantConfig, in_multiple: int = 1) -> list[tuple[str, nn.Linear]]:
    """Plain nn.Linear modules to quantize (exact type: bnb/quanto linears subclass it)."""
    assert cfg.skip is not None
    return [(name, m) for name, m in model.named_modules()
            if type(m) is nn.Linear and m.in_features % in_multiple == 0 and not _skipped(name, cfg.skip)]


def _already_quantized(model: nn.Module) -> bool:
    import bitsandbytes as bnb
    from optimum.quanto.nn import QModuleMixin

    if any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, QModuleMixin)) for m in model.modules()):
        return True
    return any(p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for p in model.parameters())


def quantized_module_names(model: nn.Module) -> list[str]:
    """Names of modules holding quantized weights (bnb, quanto, or fp8 storage)."""
    import bitsandbytes as bnb
    from optimum.quanto.nn import QModuleMixin

    names = []
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, QModuleMixin)):
            names.append(name)
        elif isinstance(weight, torch.Tensor) and weight.dtype == torch.float8_e4m3fn:
            names.append(name)
    return names


# ------------------------------------------------------------------ handlers


class _Handler(Protocol):
    def quantize(self, model: nn.Module, cfg: QuantConfig, work: torch.device | None = None) -> None: ...
    def convert(self, model: nn.Module, cfg: QuantConfig) -> None: ...
    def load(self, model: nn.Module, tensors: MutableMapping[str, torch.Tensor]) -> None: ...


def _pop_prefixed(tensors: MutableMapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    keys = [k for k in tensors if k.startswith(prefix)]
    return {k[len(prefix):]: tensors.pop(k) for k in keys}


def _frozen_param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class _Plain:
    """bf16 / fp16 / fp32: the cast done by apply_quantization is all there is."""

    def quantize(self, model: nn.Module, cfg: QuantConfig, work: torch.device | None = None) -> None:
        pass

    def convert(self, model: nn.Module, cfg: QuantConfig) -> None:
        pass

    def load(self, model: nn.Module, tensors: MutableMapping[str, torch.Tensor]) -> None:
        pass


class _BnbNF4:
    """bitsandbytes NF4: Linear4bit + Params4bit built from bnb.functional.quantize_4bit.

    Only linears with in_features % 64 == 0 are converted: bitsandbytes 0.50.2's CPU
    dequantize_4bit kernel treats each row as whole blocks and returns wrong weights
    otherwise (measured: 37% weight error at 32x32 vs 9% for the same blocks decoded by
    hand). Every FLUX and T5-XXL linear qualifies (3072, 4096, 10240, 12288, 15360 in).
    """

    @staticmethod
    def _empty(lin: nn.Linear, cfg: QuantConfig) -> nn.Module:
        import bitsandbytes as bnb

        return bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=cfg.compute_dtype,
            compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")

    def quantize(self, model: nn.Module, cfg: QuantConfig, work: torch.device | None = None) -> None:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        for name, lin in _targets(model, cfg, _NF4_BLOCKSIZE):
            q = self._empty(lin, cfg)
            home = lin.weight.device
            # packed: [out*in/2, 1] uint8; quant_state holds absmax (itself 8-bit quantized) + NF4 code
            packed, state = bnbf.quantize_4bit(
                _on(lin.weight.data, work).contiguous(), blocksize=_NF4_BLOCKSIZE, compress_statistics=True,
                quant_type="nf4", quant_storage=torch.uint8)
            if packed.device != home:
                packed = packed.to(home)
                state.to(home)  # in place: absmax, code and the nested statistics
            q.weight = bnb.nn.Params4bit(
                packed, requires_grad=False, quant_state=state, blocksize=_NF4_BLOCKSIZE,
                compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                module=q, bnb_quantized=True)
            q.quant_state = state
            if lin.bias is not None:
                q.bias = _frozen_param(lin.bias.data)
            model.set_submodule(name, q)

    def convert(self, model: nn.Module, cfg: QuantConfig) -> None:
        for name, lin in _targets(model, cfg, _NF4_BLOCKSIZE):
            model.set_submodule(name, self._empty(lin, cfg))

    def load(self, model: nn.Module, tensors: MutableMapping[str, torch.Tensor]) -> None:
        import bitsandbytes as bnb

        for name, m in model.named_modules():
            if not isinstance(m, bnb.nn.Linear4bit):
                continue
            prefix = f"{name}.weight" if name else "weight"
            packed = tensors.pop(prefix, None)
            stats = _pop_prefixed(tensors, prefix + ".")
            if packed is None or not stats:
                raise KeyError(f"{prefix}: packed NF4 weight or its quant state missing")
            m.weight = bnb.nn.Params4bit.from_prequantized(
                packed, stats, requires_grad=False, device=packed.device, module=m)


class _BnbInt8:
    """bitsandbytes LLM.int8: Linear8bitLt(has_fp16_weights=False) + Int8Params (row-wise absmax)."""

    @staticmethod
    def _empty(lin: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb

        return bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                   has_fp16_weights=False, threshold=_INT8_THRESHOLD, device="meta")

    @staticmethod
    def _param(cb: torch.Tensor, scb: torch.Tensor) -> nn.Parameter:
        import bitsandbytes as bnb

        return bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)

    def quantize(self, model: nn.Module, cfg: QuantConfig, work: torch.device | None = None) -> None:
        import bitsandbytes.functional as bnbf

        for name, lin in _targets(model, cfg):
            q = self._empty(lin)
            home = lin.weight.device
            # cb: [out, in] int8; scb: [out] fp32 row absmax (bnb quantizes from fp16, as .to() does)
            cb, scb, _ = bnbf.int8_vectorwise_quant(_on(lin.weight.data, work).contiguous().to(torch.float16))
            cb, scb = cb.to(home), scb.to(home)
            q.weight = self._param(cb, scb)
            if lin.bias is not None:
                q.bias = _frozen_param(lin.bias.data)
            model.set_submodule(name, q)

    def convert(self, model: nn.Module, cfg: QuantConfig) -> None:
        for name, lin in _targets(model, cfg):
            model.set_submodule(name, self._empty(lin))

    def load(self, model: nn.Module, tensors: MutableMapping[str, torch.Tensor]) -> None:
        import bitsandbytes as bnb

        for name, m in model.named_modules():
            if not isinstance(m, bnb.nn.Linear8bitLt):
                continue
            prefix = f"{name}." if name else ""
            cb, scb = tensors.pop(prefix + "weight", None), tensors.pop(prefix + "SCB", None)
            tensors.pop(prefix + "weight_format", None)  # always 0 = row-major in bnb >= 0.45
            if cb is None or scb is None:
                raise KeyError(f"{prefix}weight / {prefix}SCB of an int8 layer missing")
            m.weight = self._param(cb, scb)


class _Quanto:
    """optimum-quanto weight-only quantization via its public quantize + freeze."""

    def __init__(self, qtype_name: str) -> None:
        self.qtype_name = qtype_name

    def _swap(self, model: nn.Module, cfg: QuantConfig) -> None:
        from optimum import quanto

        from threedis.engine.quanto_build import place_quanto_builds

        place_quanto_builds()  # a read-only install: quanto's first-use build goes to the cache instead
        names = [name for name, _ in _targets(model, cfg)]
        if names:  # include= takes fnmatch patterns; module names have no wildcard characters
            quanto.quantize(model, weights=getattr(quanto, self.qtype_name), include=names)

    def quantize(self, model: nn.Module, cfg: QuantConfig, work: torch.device | None = None) -> None:
        from optimum import quanto

        # Always where the weights are: on CUDA quanto may repack into kernel-specific layouts.
        self._swap(model, cfg)
        quanto.freeze(model)

    def convert(self, model: nn.Module, cfg: QuantConfig) -> None:
        self._swap(model, cfg)

    def load(self, model: nn.Module, tensors: MutableMapping[str, torch.Tensor]) -> None:
        pass  # QModuleMixin._load_from_state_dict rebuilds the QTensor from weight._data/_scale


class _LayerwiseFP8:
    """fp8 e4m3 storage, upcast per layer to the compute dtype (diffusers hooks)."""

    def quantize(self, model: nn.Module, cfg: QuantConfig, work: torch.device | None = None) -> None:
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=cfg.compute_dtype,
                                skip_modules_pattern=cfg.skip)

    def convert(self, model: nn.Module, cfg: QuantConfig) -> None:
        pass  # same module classes; the hooks go on after the fp8 tensors are assigned

    def load(self, model: nn.Module, tensors: MutableMapping[str, torch.Tensor]) -> None:
        pass


_HANDLERS: Mapping[str, _Handler] = {
    **{name: _Plain() for name in PLAIN_SCHEMES},
    "fp8": _LayerwiseFP8(),
    "int8": _BnbInt8(),
    "nf4": _BnbNF4(),
    "quanto-int8": _Quanto("qint8"),
    "quanto-int4": _Quanto("qint4"),
    "quanto-fp8": _Quanto("qfloat8"),
}


# ------------------------------------------------------------------ public


def apply_quantization(model: nn.Module, config: QuantConfig | str,
                       work_device: torch.device | str | None = None) -> nn.Module:
    """Quantize `model` in place (and return it) according to `config`.

    Non-quantized weights are cast to the compute dtype first; the model is put in
    eval mode with gradients off. The quantized weights stay where the float weights were.
    work_device: where bitsandbytes (int8, nf4) does the arithmetic, one layer at a time
    (a CUDA device: seconds for FLUX instead of ~25 min on a 2-core CPU for nf4);
    None: where the weights are. quanto and fp8 always work where the weights are.
    """
    cfg = (QuantConfig(config) if isinstance(config, str) else config).resolved(model)
    if _already_quantized(model):
        raise UserError("model is already quantized; load it again in a float dtype before quantizing")
    model.eval().requires_grad_(False)
    _cast(model, cfg.compute_dtype)
    _HANDLERS[cfg.scheme].quantize(model, cfg, None if work_device is None else torch.device(work_device))
    return model


def convert_skeleton(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Turn a `meta`-device skeleton into the module layout `apply_quantization` produces.

    No weights are touched; `load_quantized_state` then assigns the cached tensors.
    """
    cfg = config.resolved(model)
    model.eval().requires_grad_(False)
    _cast(model, cfg.compute_dtype)  # meta: free; non-quantized tensors arrive in this dtype anyway
    _HANDLERS[cfg.scheme].convert(model, cfg)
    return model


def load_quantized_state(model: nn.Module, config: QuantConfig, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Assign a quantized state dict (from `model.state_dict()` after apply_quantization) to a
    skeleton made by `convert_skeleton`; raises KeyError/RuntimeError if anything is missing.
    """
    cfg = config.resolved(model)
    tensors = dict(tensors)
    handler = _HANDLERS[cfg.scheme]
    handler.load(model, tensors)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise KeyError(f"unexpected tensors: {', '.join(result.unexpected_keys[:5])}")
    still_meta = [name for name, t in _named_tensors(model) if t.is_meta]
    if still_meta:
        raise KeyError(f"tensors missing from the quantized state: {', '.join(still_meta[:5])}")
    if cfg.scheme == "fp8":
        _LayerwiseFP8().quantize(model, cfg)  # re-register the casting hooks (weights already fp8)
    model.requires_grad_(False)
    return model


def _on(weight: torch.Tensor, work: torch.device | None) -> torch.Tensor:
    """The weight on the work device (a copy of one layer at a time), or as it is."""
    return weight if work is None or weight.device == work else weight.to(work)


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating weights; plain nn.Module.to skips diffusers' keep-in-fp32 warning, which
    does not apply (the cast is the compute dtype the caller asked for)."""
    if any(t.is_floating_point() and t.dtype != dtype for _, t in _named_tensors(model)):
        nn.Module.to(model, dtype)


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()
