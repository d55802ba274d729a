"""Memory profiles: which weight format, device and offload each model gets.

A profile is data (a TOML file) turned into a frozen dataclass here, so the
runtime never guesses from names. Built-in profiles live in `threedis.profiles`
(`8gb`, `12gb`, `16gb`, `24gb`, `cpu`); `auto` picks one from the free VRAM.
A user file may start from a built-in with `base = "12gb"` and change a few
keys; the CLI/API may change keys with dotted overrides ("transformer.weights=nf4").

A file states only its decisions: every key it leaves out takes its default
(TOP_DEFAULTS, MODEL_DEFAULTS, defined once here); `resolved_toml` (and `threedis
profiles --show NAME`) prints every key as the runtime reads it. Validation refuses
what the runtime would not act on for a model (SUPPORT), so every accepted key is
honoured by threedis.engine.runtime.ModelManager.

Sizes in profiles and messages are in GB of 2**30 bytes, the unit card names
and nvidia-smi use ("a 12 GB card").
"""

from __future__ import annotations

import difflib
import enum
import importlib.resources
import json
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from threedis.engine.errors import UserError
from threedis.engine.paths import file_problem

GIB = 1024**3
MAX_PROFILE_BYTES = 1 << 20  # far above any profile; bounds what a wrong path makes us read

# Every model the engine may load; each profile states a policy for all of them.
MODEL_KEYS: tuple[str, ...] = (
    "transformer", "t5", "clip", "vae",
    "ldm3d_unet", "ldm3d_vae", "ldm3d_text", "sam2", "depth_estimator",
)


class Weights(str, enum.Enum):
    """Storage format of a model's weights (compute is bf16 for every non-float format)."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    FP8 = "fp8"                  # fp8 e4m3 storage, bf16 compute via layerwise casting
    INT8 = "int8"                # bitsandbytes LLM.int8
    NF4 = "nf4"                  # bitsandbytes 4-bit NormalFloat
    QUANTO_INT8 = "quanto-int8"
    QUANTO_INT4 = "quanto-int4"
    QUANTO_FP8 = "quanto-fp8"

    @property
    def needs_cuda(self) -> bool:
        """bitsandbytes kernels are CUDA-only in the versions we support."""
        return self in (Weights.INT8, Weights.NF4)


class Placement(str, enum.Enum):
    """Where a model runs, and whether it stays loaded after its stage.

    gpu / cpu: loaded once, kept (the GPU one may be offloaded between stages);
    gpu-then-freed / cpu-then-freed: loaded for its stage, freed right after.
    """

    GPU = "gpu"
    CPU = "cpu"
    GPU_THEN_FREED = "gpu-then-freed"
    CPU_THEN_FREED = "cpu-then-freed"

    @property
    def on_gpu(self) -> bool:
        return self in (Placement.GPU, Placement.GPU_THEN_FREED)

    @property
    def freed_after_stage(self) -> bool:
        return self in (Placement.GPU_THEN_FREED, Placement.CPU_THEN_FREED)


class Offload(str, enum.Enum):
    NONE = "none"
    MODEL = "model"   # whole model moves host -> GPU for its stage
    GROUP = "group"   # groups of blocks stream host -> GPU during the forward


class AttentionBackend(str, enum.Enum):
    AUTO = "auto"
    TRITON = "triton"
    FLEX = "flex"
    SDPA = "sdpa"


class StepCache(str, enum.Enum):
    NONE = "none"
    FIRST_BLOCK = "first-block"
    MAGCACHE = "magcache"
    TAYLORSEER = "taylorseer"


@dataclass(frozen=True)
class ModelPolicy:
    """How one model is stored and placed."""

    weights: Weights
    device: Placement
    offload: Offload = Offload.NONE
    offload_group_blocks: int = 1
    use_streams: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class Profile:
    """A complete memory recipe; `models` maps every key of MODEL_KEYS to its policy."""

    name: str
    description: str
    min_vram_gb: float
    vae_tiling: bool
    attention_backend: AttentionBackend
    step_cache: StepCache
    step_cache_threshold: float
    text_encoder_cache: bool
    models: Mapping[str, ModelPolicy]
    origin: str = ""   # where it came from: "built-in", a path, the auto reason, overrides

    def policy(self, model: str) -> ModelPolicy:
        if model not in self.models:
            raise UserError(f"profile {self.name!r} has no model {model!r}; known: {', '.join(MODEL_KEYS)}")
        return self.models[model]

    @property
    def uses_gpu(self) -> bool:
        return any(p.device.on_gpu for p in self.models.values())

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "models"}
        out["models"] = {k: p.to_dict() for k, p in self.models.items()}
        return out


# -- field schema: key -> (converter, allowed values or None) ---------------------------------

_TOP_FIELDS: dict[str, type] = {
    "name": str, "description": str, "min_vram_gb": float, "vae_tiling": bool,
    "attention_backend": AttentionBackend, "step_cache": StepCache,
    "step_cache_threshold": float, "text_encoder_cache": bool,
}
_MODEL_FIELDS: dict[str, type] = {
    "weights": Weights, "device": Placement, "offload": Offload,
    "offload_group_blocks": int, "use_streams": bool,
}
# A profile states its decisions; everything it leaves out is one of these defaults.
# min_vram_gb, vae_tiling and the transformer's and T5's formats and devices have none:
# they are what a memory recipe is about.
_TOP_REQUIRED = ("min_vram_gb", "vae_tiling")
TOP_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "description": "", "attention_backend": "auto", "step_cache": "none", "step_cache_threshold": 0.0,
    "text_encoder_cache": True,
})
_MODEL_REQUIRED = ("weights", "device")
_POLICY_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"offload": "none", "offload_group_blocks": 1, "use_streams": False})
MODEL_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "clip": {"weights": "bf16", "device": "gpu"},            # 0.23 GB: resident in full precision
    "vae": {"weights": "bf16", "device": "gpu"},             # 0.16 GB: resident
    # Stage 1 (~1.1B params) runs once before FLUX: load, run, free. SD-1.x UNets were
    # trained for fp16; SD-1.x VAEs overflow in fp16.
    "ldm3d_unet": {"weights": "fp16", "device": "gpu-then-freed"},
    "ldm3d_vae": {"weights": "fp32", "device": "gpu-then-freed"},
    "ldm3d_text": {"weights": "fp16", "device": "gpu-then-freed"},
    "sam2": {"weights": "bf16", "device": "gpu-then-freed"},  # released for bf16 autocast
    "depth_estimator": {"weights": "bf16", "device": "gpu-then-freed"},
})


@dataclass(frozen=True)
class ModelSupport:
    """What the runtime does for one model: validation refuses every other value.

    follows: a model whose device and offload this one must share (stage 1's three
    parts load and run as one pipeline, placed by ldm3d_unet).
    """

    weights: tuple[Weights, ...] = tuple(Weights)
    offloads: tuple[Offload, ...] = (Offload.NONE, Offload.MODEL)
    weights_reason: str = ""
    follows: str | None = None

    @property
    def streams_groups(self) -> bool:
        return Offload.GROUP in self.offloads


_FLOATS = (Weights.FP16, Weights.BF16, Weights.FP32)
_AUX_REASON = "the stage-1, SAM2 and depth models load through diffusers/transformers in a float format"
SUPPORT: Mapping[str, ModelSupport] = MappingProxyType({
    "transformer": ModelSupport(offloads=tuple(Offload)),  # only FLUX has the block lists group offload streams
    "t5": ModelSupport(), "clip": ModelSupport(), "vae": ModelSupport(),
    "ldm3d_unet": ModelSupport(_FLOATS, weights_reason=_AUX_REASON),
    "ldm3d_vae": ModelSupport(_FLOATS, weights_reason=_AUX_REASON, follows="ldm3d_unet"),
    "ldm3d_text": ModelSupport(_FLOATS, weights_reason=_AUX_REASON, follows="ldm3d_unet"),
    "sam2": ModelSupport(_FLOATS, weights_reason=_AUX_REASON),
    "depth_estimator": ModelSupport(_FLOATS, weights_reason=_AUX_REASON),
})
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(where: str, key: str, kind: type, value: Any) -> Any:
    """Turn a TOML value or an override string into the field's type, or say what is allowed."""
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        allowed = [m.value for m in kind]
        text = str(value).strip().lower() if not isinstance(value, bool) else str(value).lower()
        if text in allowed:
            return kind(text)
        raise UserError(f"{where}: {key} = {value!r} is not allowed; choose one of "
                        f"{', '.join(allowed)}{_suggest(text, allowed)}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE and not isinstance(value, (int, float)):
            return text in _TRUE
        raise UserError(f"{where}: {key} = {value!r} must be true or false")
    if kind is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise UserError(f"{where}: {key} = {value!r} must be a whole number")
        try:
            return int(str(value).strip())
        except ValueError:
            raise UserError(f"{where}: {key} = {value!r} must be a whole number") from None
    if kind is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: {key} = {value!r} must be a number")
        try:
            return float(str(value).strip())
        except ValueError:
            raise UserError(f"{where}: {key} = {value!r} must be a number") from None
    if not isinstance(value, str):
        raise UserError(f"{where}: {key} = {value!r} must be a string")
    return value


def _check_keys(where: str, given: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in given:
        if key not in allowed:
            raise UserError(f"{where}: unknown key {key!r}{_suggest(key, allowed)}; "
                            f"allowed keys: {', '.join(allowed)}")


# -- building and validating --------------------------------------------------------------------

def _model_policy(where: str, model: str, table: Mapping[str, Any], base: ModelPolicy | None) -> ModelPolicy:
    given = {f"{model}.{k}": v for k, v in table.items()}
    _check_keys(where, given, [f"{model}.{f}" for f in _MODEL_FIELDS])
    values: dict[str, Any] = base.to_dict() if base else {**_POLICY_DEFAULTS, **MODEL_DEFAULTS.get(model, {})}
    values.update(table)
    for key in _MODEL_REQUIRED:
        if key not in values:
            raise UserError(f"{where}: missing key {model}.{key} (one of "
                            f"{', '.join(m.value for m in _MODEL_FIELDS[key])})")
    return ModelPolicy(**{k: _convert(where, f"{model}.{k}", _MODEL_FIELDS[k], v) for k, v in values.items()})


def _validate(profile: Profile, where: str) -> None:
    """Cross-field rules: combinations that cannot run, each with the fix."""
    if profile.min_vram_gb < 0:
        raise UserError(f"{where}: min_vram_gb must be >= 0, got {profile.min_vram_gb}")
    if profile.step_cache_threshold < 0:
        raise UserError(f"{where}: step_cache_threshold must be >= 0, got {profile.step_cache_threshold}")
    if profile.step_cache is not StepCache.NONE and profile.step_cache_threshold <= 0:
        raise UserError(f"{where}: step_cache = {profile.step_cache.value!r} needs a step_cache_threshold > 0 "
                        f"(e.g. 0.05), or set step_cache = 'none'")
    for key, p in profile.models.items():
        if p.device is Placement.CPU and p.offload is not Offload.NONE:
            raise UserError(f"{where}: {key}.offload = {p.offload.value!r} with {key}.device = 'cpu': a CPU "
                            f"model has nothing to offload; set {key}.offload = 'none' or device = 'gpu'")
        if p.device.freed_after_stage and p.offload is not Offload.NONE:
            raise UserError(f"{where}: {key}.device = {p.device.value!r} is freed after its stage; offload "
                            f"needs device = 'gpu'. Set {key}.offload = 'none' or {key}.device = 'gpu'")
        if p.offload_group_blocks < 1:
            raise UserError(f"{where}: {key}.offload_group_blocks must be >= 1, got {p.offload_group_blocks}")
        if not p.device.on_gpu and p.weights.needs_cuda:
            raise UserError(f"{where}: {key}.weights = {p.weights.value!r} (bitsandbytes) needs CUDA but "
                            f"{key}.device = {p.device.value!r}; use bf16, fp32, fp8 or a quanto-* format on the CPU")
        _check_supported(where, key, p, profile.models)
    if not profile.uses_gpu and profile.attention_backend is AttentionBackend.TRITON:
        raise UserError(f"{where}: attention_backend = 'triton' needs a GPU but every model is on the CPU; "
                        f"use 'auto', 'flex' or 'sdpa'")


def _check_supported(where: str, key: str, p: ModelPolicy, models: Mapping[str, ModelPolicy]) -> None:
    """Refuse what the runtime would not act on for this model (SUPPORT), naming what it would."""
    support = SUPPORT[key]
    if p.weights not in support.weights:
        raise UserError(f"{where}: {key}.weights = {p.weights.value!r} is not supported for {key} "
                        f"({support.weights_reason}); use one of {', '.join(w.value for w in support.weights)}")
    if p.offload not in support.offloads:
        raise UserError(f"{where}: {key}.offload = {p.offload.value!r} is not supported for {key}: only the "
                        f"transformer streams groups of blocks; use one of "
                        f"{', '.join(o.value for o in support.offloads)}")
    if not support.streams_groups:
        for field, default in (("offload_group_blocks", 1), ("use_streams", False)):
            value = getattr(p, field)
            if value != default:
                raise UserError(f"{where}: {key}.{field} = {_plain_toml(value)} is not used: only the transformer "
                                f"streams groups of blocks; leave {key}.{field} at {_plain_toml(default)}")
    if support.follows is not None:
        lead = models[support.follows]
        for field in ("device", "offload"):
            mine, theirs = getattr(p, field).value, getattr(lead, field).value
            if mine != theirs:
                raise UserError(f"{where}: {key}.{field} = {mine!r} differs from {support.follows}.{field} = "
                                f"{theirs!r}: stage 1 loads and runs its UNet, VAE and text encoder as one "
                                f"pipeline; give ldm3d_unet, ldm3d_vae and ldm3d_text the same {field}")


def _plain_toml(value: Any) -> str:
    """A value as a profile file writes it."""
    value = _plain(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def _build(data: Mapping[str, Any], where: str, default_name: str, base: Profile | None,
           origin: str) -> Profile:
    allowed = ["base", *_TOP_FIELDS, *MODEL_KEYS]
    _check_keys(where, data, allowed)
    top: dict[str, Any] = base.to_dict() if base else {}
    top.pop("models", None)
    top.pop("origin", None)
    top["name"] = default_name  # a file based on a built-in is its own profile, named after the file
    for key, value in TOP_DEFAULTS.items():
        top.setdefault(key, value)
    for key, value in data.items():
        if key in _TOP_FIELDS:
            top[key] = value
        elif key in MODEL_KEYS and not isinstance(value, Mapping):
            raise UserError(f"{where}: {key!r} must be a table ([{key}]) of "
                            f"{', '.join(_MODEL_FIELDS)}")
    if base is None:
        for key in _TOP_REQUIRED:
            if key not in top:
                raise UserError(f"{where}: missing key {key!r}; add it or start from a built-in "
                                f"profile with base = \"12gb\"")
    top_values = {k: _convert(where, k, _TOP_FIELDS[k], v) for k, v in top.items()}
    models: dict[str, ModelPolicy] = {}
    for key in MODEL_KEYS:
        table = data.get(key)
        base_policy = base.models[key] if base else None
        if table is None and base_policy is None and key not in MODEL_DEFAULTS:
            raise UserError(f"{where}: missing table [{key}] (weights, device, offload, ...); add it or "
                            f"start from a built-in profile with base = \"12gb\"")
        models[key] = _model_policy(where, key, table or {}, base_policy)
    profile = Profile(**top_values, models=MappingProxyType(models), origin=origin)
    _validate(profile, where)
    return profile


# -- loading ----------------------------------------------------------------------------------

def list_profiles() -> list[str]:
    """Built-in profile names, smallest VRAM first (`auto` is a selector, not a file)."""
    names = [p.name[:-5] for p in importlib.resources.files("threedis.profiles").iterdir()
             if p.name.endswith(".toml")]
    return [p.name for p in sorted((_load_builtin(n) for n in names), key=lambda p: p.min_vram_gb)]


def _load_builtin(name: str) -> Profile:
    resource = importlib.resources.files("threedis.profiles").joinpath(f"{name}.toml")
    return _from_text(resource.read_text(encoding="utf-8"), f"profile {name!r}", name, f"built-in {name}")


def _from_text(text: str, where: str, default_name: str, origin: str) -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{where}: not valid TOML ({exc})") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise UserError(f"{where}: the TOML is nested too deeply to be a profile; is this the right file?") from None
    base = None
    if "base" in data:
        base_name = data["base"]
        if base_name not in _builtin_names():
            raise UserError(f"{where}: base = {base_name!r} is not a built-in profile; choose one of "
                            f"{', '.join(list_profiles())}{_suggest(str(base_name), _builtin_names())}")
        base = _load_builtin(base_name)
    return _build(data, where, default_name, base, origin)


def _builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in importlib.resources.files("threedis.profiles").iterdir()
                  if p.name.endswith(".toml"))


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """CLI `--set key=value` items -> {key: value}."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} must look like key=value, e.g. transformer.weights=nf4")
        out[key.strip()] = value.strip()
    return out


def apply_overrides(profile: Profile, overrides: Mapping[str, Any] | None) -> Profile:
    """Return a copy of `profile` with dotted keys changed ("vae_tiling=false", "t5.device=cpu")."""
    if not overrides:
        return profile
    where = f"override of profile {profile.name!r}"
    top = {f.name: getattr(profile, f.name) for f in fields(profile) if f.name not in ("models", "origin")}
    models = dict(profile.models)
    top_keys = [k for k in _TOP_FIELDS if k != "name"]
    all_keys = top_keys + [f"{m}.{f}" for m in MODEL_KEYS for f in _MODEL_FIELDS]
    for key, value in overrides.items():
        model, dot, field = key.partition(".")
        if dot and model in MODEL_KEYS and field in _MODEL_FIELDS:
            models[model] = replace(models[model], **{field: _convert(where, key, _MODEL_FIELDS[field], value)})
        elif not dot and key in top_keys:
            top[key] = _convert(where, key, _TOP_FIELDS[key], value)
        else:
            raise UserError(f"{where}: unknown key {key!r}{_suggest(key, all_keys)}; keys look like "
                            f"'vae_tiling' or 'transformer.weights' (models: {', '.join(MODEL_KEYS)}; "
                            f"fields: {', '.join(_MODEL_FIELDS)})")
    listed = ", ".join(f"{k}={v}" for k, v in overrides.items())
    new = Profile(**top, models=MappingProxyType(models),
                  origin=f"{profile.origin} + overrides {listed}".strip(" +"))
    _validate(new, where)
    return new


def load_profile(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> Profile:
    """A built-in name ("12gb") or a TOML path, with optional dotted overrides applied."""
    text = str(name_or_path)
    if text.strip().lower() == "auto":
        return resolve_profile("auto", None, overrides)
    if text.strip().lower() in _builtin_names():
        profile = _load_builtin(text.strip().lower())
    else:
        path = Path(text).expanduser()
        problem = file_problem(path)
        if problem == "not found":
            names = list_profiles()
            raise UserError(f"profile {text!r} is neither a built-in ({', '.join(names)}, auto) nor a "
                            f"TOML file{_suggest(text.lower(), names + ['auto'])}")
        if problem is not None:
            raise UserError(f"profile file {path}: {problem}; give a TOML file or a built-in name "
                            f"({', '.join(list_profiles())}, auto)")
        profile = _from_text(_read_profile_file(path), f"profile file {path}", path.stem, str(path))
    return apply_overrides(profile, overrides)


def _read_profile_file(path: Path) -> str:
    """A profile file's text: at most MAX_PROFILE_BYTES of UTF-8 (a profile is a few hundred bytes)."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read profile file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise UserError(f"profile file {path} is larger than {MAX_PROFILE_BYTES} bytes; is this the right file?")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"profile file {path} is not UTF-8 text (byte {exc.start}); give a TOML profile") from None


def resolved_toml(profile: Profile) -> str:
    """Every key of `profile`, defaults filled in, as a profile file (loadable as one).

    Why: a profile file states only its decisions; this is what the runtime and the
    planner actually read, e.g. for `threedis profiles --show 12gb`.
    """
    lines = [f"# {profile.name}, resolved ({profile.origin or 'built from data'}): every key, defaults filled in"]
    for key in _TOP_FIELDS:
        lines.append(f"{key} = {_plain_toml(getattr(profile, key))}")
    for model in MODEL_KEYS:
        lines += ["", f"[{model}]"]
        lines += [f"{k} = {_plain_toml(v)}" for k, v in profile.policy(model).to_dict().items()]
    return "\n".join(lines) + "\n"


def select_auto_profile(free_vram_bytes: int | None,
                        total_vram_bytes: int | None = None) -> tuple[Profile, str]:
    """Largest built-in GPU profile whose min_vram_gb fits the free VRAM, else cpu; with the reason."""
    profiles = [_load_builtin(n) for n in _builtin_names()]
    if free_vram_bytes is None:
        cpu = _pick_cpu(profiles)
        return cpu, f"picked {cpu.name}: no CUDA device"
    free = free_vram_bytes / GIB
    of = f" of {total_vram_bytes / GIB:.1f} GB" if total_vram_bytes else ""
    gpu = sorted((p for p in profiles if p.uses_gpu), key=lambda p: p.min_vram_gb)
    fitting = [p for p in gpu if p.min_vram_gb <= free]
    if not fitting:
        cpu = _pick_cpu(profiles)
        smallest = f"; the smallest GPU profile {gpu[0].name} needs {gpu[0].min_vram_gb:.1f} GB" if gpu else ""
        return cpu, f"picked {cpu.name}: {free:.1f} GB free{of}{smallest}"
    best = fitting[-1]
    nxt = gpu[len(fitting)] if len(fitting) < len(gpu) else None
    more = f"; {nxt.name} needs {nxt.min_vram_gb:.1f} GB" if nxt else ""
    return best, f"picked {best.name}: {free:.1f} GB free{of} (needs {best.min_vram_gb:.1f} GB){more}"


def _pick_cpu(profiles: Sequence[Profile]) -> Profile:
    for p in profiles:
        if not p.uses_gpu:
            return p
    raise UserError("no CPU profile is installed; reinstall threedis-flux")


def _device_type(device: Any) -> str:
    """"cuda", "cpu", ... for `device` (None: cuda if present, else cpu), without torch where the answer is sure."""
    from threedis.engine.checks import device_type
    from threedis.engine.cuda_probe import cuda_surely_absent

    if device is None and cuda_surely_absent():
        return "cpu"
    kind = device_type(device)
    if kind is not None:
        return kind
    import torch

    if device is not None:
        return torch.device(device).type
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_profile_device(profile: Profile, device_type: str) -> None:
    """A profile that puts models on the GPU, for an engine off CUDA: one line saying what to use instead."""
    if device_type != "cuda" and profile.uses_gpu:
        gpu_models = [k for k, p in profile.models.items() if p.device.on_gpu]
        raise UserError(f"profile {profile.name!r} puts {', '.join(gpu_models)} on the GPU but the device is "
                        f"{device_type}; use --profile cpu (or auto)")


def resolve_profile(name_or_path: str | Path, device: Any = None,
                    overrides: Mapping[str, Any] | None = None) -> Profile:
    """The profile an engine on `device` should use; "auto" measures free VRAM (origin says why).

    torch is imported only to measure VRAM or to find out whether there is CUDA, so that
    `threedis plan` and the CLI's early checks answer at once on a machine without CUDA.
    """
    kind = _device_type(device)
    if str(name_or_path).strip().lower() == "auto":
        free = total = None
        if kind == "cuda":
            import torch

            if torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info(torch.device(device) if device is not None else None)
        profile, reason = select_auto_profile(free, total)
        profile = replace(profile, origin=f"auto: {reason}")
    else:
        profile = load_profile(name_or_path)
    check_profile_device(profile, kind)
    return apply_overrides(profile, overrides)
