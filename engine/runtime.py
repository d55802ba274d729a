"""Runs a memory profile: each model's weight format, device, offload and lifetime.

Why: a profile (threedis.engine.profiles) is only data. `ModelManager` is the one
place that turns a `ModelPolicy` into actions, so the pipeline asks for a model
per stage (`with manager.use("t5") as t5:`) and never knows whether it was resident,
parked in host RAM, streamed block by block, or loaded just now and freed after.

Every model is a slot (SLOTS): the four rendering models, and the auxiliary ones
(stage 1, whose UNet, VAE and text encoder load as one pipeline placed by
ldm3d_unet; SAM2; Depth Anything), which threedis.engine.stages loads from their
folders through `use(slot, load=...)`. Every slot reads its profile entry the same way:
  weights  bf16/fp16/fp32: loaded in that dtype. fp8, int8, nf4, quanto-* (rendering
           models only, profiles.SUPPORT): through the quantized-weight cache
           (quant_cache.load_quantized): quantized once, later loads read the cache;
           compute dtype bf16.
  device   gpu: runs on the engine's CUDA device, kept loaded; cpu: runs on the CPU,
           kept loaded; gpu-then-freed / cpu-then-freed: loaded for its stage, then
           deleted and its memory returned (offload.release_memory).
  offload  none; model: on the host between stages, on the GPU only inside `use`;
           group (transformer only): blocks streamed during the forward
           (threedis.engine.offload).
On a CPU-only engine every "gpu" resolves to the CPU; the moves become no-ops but the
bookkeeping (`placement()`) still follows the profile, so tests can check it.

Models load lazily at first use, inside whatever profiler is bound (`bind`), which
records "load <model>" and, on a quantized-cache miss, "read <model>" (the float
source) and "quantize <model>" (quantize + write the cache entry); whole-model moves
between host and GPU are "onload <model>" / "offload <model>" (none on a CPU engine).
"""

from __future__ import annotations

import contextlib
import enum
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from threedis.engine import loading
from threedis.engine.errors import UserError
from threedis.engine.offload import apply_group_offload, move_model, move_parts, release_memory
from threedis.engine.profiles import MODEL_KEYS, Offload, Placement, Profile, apply_overrides
from threedis.engine.quantize import PLAIN_SCHEMES as _PLAIN  # the one weights-name -> float dtype map
from threedis.engine.compute import QUANT_COMPUTE_DTYPE_NAME, VAE_TILE_PX  # noqa: F401 (re-exported)

QUANT_COMPUTE_DTYPE = getattr(torch, QUANT_COMPUTE_DTYPE_NAME)  # compute dtype of every non-float format

__all__ = ["AUX_SLOTS", "RUNTIME_MODELS", "SLOTS", "ModelManager", "Residency", "dtype_weights"]

RUNTIME_MODELS: tuple[str, ...] = ("transformer", "t5", "clip", "vae")
AUX_SLOTS: tuple[str, ...] = ("stage1", "sam2", "depth_estimator")
# slot -> the profile entries it reads; the first one places it (device, offload).
SLOTS: Mapping[str, tuple[str, ...]] = {
    **{k: (k,) for k in RUNTIME_MODELS},
    "stage1": ("ldm3d_unet", "ldm3d_vae", "ldm3d_text"), "sam2": ("sam2",), "depth_estimator": ("depth_estimator",),
}
assert sorted(k for keys in SLOTS.values() for k in keys) == sorted(MODEL_KEYS)


class Residency(str, enum.Enum):
    """Where a model is between and during stages (the `state` of `placement()`)."""

    NOT_LOADED = "not loaded"
    RESIDENT = "resident"      # on its run device all the time
    PARKED = "parked"          # model offload: in host RAM between stages
    IN_STAGE = "in stage"      # inside a `use` block, on its run device
    STREAMED = "streamed"      # group offload: blocks move during each forward
    FREED = "freed"            # gpu-then-freed, after its stage


def dtype_weights(dtype: torch.dtype) -> str:
    """The profile weights name of a float dtype (an explicit engine dtype overrides the profile)."""
    for name, value in _PLAIN.items():
        if value == dtype:
            return name
    raise UserError(f"dtype {dtype} is not one of bfloat16, float16, float32")


@dataclass
class _Slot:
    key: str
    weights: str
    home: torch.device          # between stages
    run: torch.device           # during its stage
    policy_key: str = ""        # the profile entry that places it
    at: torch.device | None = None  # where the model is now
    move: Callable[[Any, torch.device], Any] = move_model
    model: Any = None
    tokenizer: Any = None
    given: bool = False         # handed in by the caller: never freed or re-quantized, only moved
    loads: int = 0
    state: Residency = Residency.NOT_LOADED
    cache: str | None = None    # quantized cache "hit" / "miss" of the last load
    dtype: torch.dtype = QUANT_COMPUTE_DTYPE  # compute dtype
    offloader: Any = None       # BlockOffloader of a group-offloaded quantized model


class ModelManager:
    """Loads, places, offloads and frees every model of one engine, per profile.

    source: checkpoint folder to load from (None: only `given` models exist).
    cache_root: folder for the quantized-weight cache ("<cache_root>/quantized").
    given: models already in memory ({"transformer": m, "clip": m, ...}), used as they are.
    tokenizers: tokenizers of given text encoders ({"clip": tok, "t5": tok}).
    dtype: an explicit float dtype for every model, replacing the profile's weight formats
        (exact comparisons; no quantization). None: the profile decides.
    """

    def __init__(self, profile: Profile, device: torch.device | str, source: Path | None,
                 cache_root: Path | None = None, given: Mapping[str, Any] | None = None,
                 tokenizers: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None) -> None:
        from threedis.engine.profiler import Profiler

        self.device = torch.device(device)
        if dtype is not None:
            name = dtype_weights(dtype)
            overridden = apply_overrides(profile, {f"{k}.weights": name for k in RUNTIME_MODELS})
            profile = replace(overridden, origin=f"{profile.origin} + dtype {name}".strip(" +"))
        self.profile = profile
        self.source = Path(source) if source is not None else None
        self.cache_root = Path(cache_root) if cache_root is not None else None
        self.loads: dict[str, int] = {k: 0 for k in SLOTS}  # loads per model (EncoderAccess)
        self.profiler: Any = Profiler(enabled=False)
        self._on_load: dict[str, list[Callable[[Any], None]]] = {k: [] for k in SLOTS}
        self._on_free: dict[str, list[Callable[[], None]]] = {k: [] for k in SLOTS}
        self._sizes: Any = None
        self._slots = {k: self._new_slot(k) for k in SLOTS}
        for key, model in (given or {}).items():
            if model is None:
                continue
            slot = self._slot(key)
            slot.model, slot.given = model, True
            slot.tokenizer = (tokenizers or {}).get(key)
            slot.weights, slot.dtype = _describe_given(model)
            self._configure(slot)

    # -- policy -> devices ----------------------------------------------------------------------

    def _new_slot(self, key: str) -> _Slot:
        policy_key = SLOTS[key][0]
        policy = self.profile.policy(policy_key)
        cpu = torch.device("cpu")
        gpu = self.device  # "gpu" means the engine's device: the CPU on a CPU-only engine
        if not policy.device.on_gpu:
            home, run = cpu, cpu
        elif policy.device is Placement.GPU_THEN_FREED or policy.offload is not Offload.NONE:
            home, run = cpu, gpu
        else:
            home, run = gpu, gpu
        return _Slot(key, policy.weights.value, home, run, policy_key=policy_key,
                     move=move_model if key in RUNTIME_MODELS else move_parts,
                     dtype=_PLAIN.get(policy.weights.value, QUANT_COMPUTE_DTYPE))

    def _slot(self, key: str) -> _Slot:
        if key not in self._slots:
            raise UserError(f"unknown model {key!r}; the runtime manages {', '.join(SLOTS)}")
        return self._slots[key]

    def _policy(self, slot: _Slot) -> Any:
        return self.profile.policy(slot.policy_key)

    def load_device(self, key: str) -> torch.device:
        """Where a loader should put the model: its home if the profile parks it between stages
        (model offload), else where it runs (saves a host -> GPU copy for a freed model)."""
        slot = self._slot(key)
        return slot.home if self._policy(slot).offload is Offload.MODEL else slot.run

    def freed_after_stage(self, key: str) -> bool:
        """True when the profile frees this model as soon as its stage ends."""
        slot = self._slot(key)
        return self._policy(slot).device.freed_after_stage and not slot.given

    def weights_dtype(self, profile_key: str) -> torch.dtype:
        """The float dtype of a profile entry's weights (the auxiliary models: float formats only)."""
        return _PLAIN[self.profile.policy(profile_key).weights.value]

    def run_device(self, key: str) -> torch.device:
        """Where the model computes (inputs go there)."""
        return self._slot(key).run

    def compute_dtype(self, key: str) -> torch.dtype:
        return self._slot(key).dtype

    def format_tag(self, key: str) -> str:
        """Weights format and run device: what changes a text encoder's output (prompt-cache key)."""
        slot = self._slot(key)
        return f"{slot.weights}@{slot.run.type}"

    def on_load(self, key: str, fn: Callable[[Any], None]) -> None:
        """Run fn(model) after every load of `key` (and now, if it is loaded): processors, caches."""
        self._on_load[self._slot(key).key].append(fn)
        if self._slots[key].model is not None:
            fn(self._slots[key].model)

    def on_free(self, key: str, fn: Callable[[], None]) -> None:
        """Run fn() when `key` is freed, so nothing else keeps it alive."""
        self._on_free[self._slot(key).key].append(fn)

    @contextlib.contextmanager
    def bind(self, profiler: Any) -> Iterator[None]:
        """Record loads in `profiler` (a render's) while inside."""
        previous, self.profiler = self.profiler, profiler
        try:
            yield
        finally:
            self.profiler = previous

    # -- bookkeeping ----------------------------------------------------------------------------

    def placement(self) -> dict[str, dict[str, Any]]:
        """Per profile entry: format, the profile's placement, where its slot lives/runs, its state now.

        Keyed by profile key (stage 1's three entries share the "stage1" slot), so that a
        render's settings can pin each entry's weights again (outputs.rerender_from_png).
        """
        out = {}
        for name, slot in self._slots.items():
            on = None
            if slot.model is not None:
                first = next(iter(slot.model.parameters()), None) if hasattr(slot.model, "parameters") else None
                on = str(first.device) if first is not None else (str(slot.at) if slot.at is not None else None)
            for key in SLOTS[name]:
                policy = self.profile.policy(key)
                weights = slot.weights if key == slot.policy_key else policy.weights.value
                out[key] = {"weights": weights, "device": policy.device.value, "offload": policy.offload.value,
                            "home": str(slot.home), "run": str(slot.run), "state": slot.state.value, "on": on,
                            "loads": slot.loads, "quantized_cache": slot.cache, "given": slot.given,
                            "slot": name}
        return out

    def config(self, key: str) -> Any:
        """The model's config without loading it (config.json), e.g. the VAE's scale factor."""
        from types import SimpleNamespace

        model = self._slot(key).model
        if model is not None:
            return model.config
        folder = self._require_source(key) / loading.SUBFOLDERS[key]
        cls = loading.model_class(key)
        with loading.loading_component(loading.SUBFOLDERS[key], folder):  # a broken file: one line
            if hasattr(cls, "load_config"):  # diffusers
                return SimpleNamespace(**cls.load_config(folder))
            return cls.config_class.from_pretrained(folder)

    def loaded(self, key: str) -> Any:
        """The model if it is in memory now, else None (never loads)."""
        return self._slot(key).model

    # -- loading --------------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        """The model (loaded if needed), where it lives between stages: for LoRA, hooks, tests."""
        slot = self._slot(key)
        if slot.model is None:
            self._load(slot)
        return slot.model

    def tokenizer(self, key: str) -> Any:
        slot = self._slot(key)
        if slot.tokenizer is None:
            root = self._require_source(key)
            slot.tokenizer = loading.load_t5_tokenizer(root) if key == "t5" else loading.load_clip_tokenizer(root)
        return slot.tokenizer

    def _require_source(self, key: str) -> Path:
        if self.source is None:
            raise UserError(f"the {key} model is needed but was not given and there is no checkpoint to load it from")
        return self.source

    def _load_float(self, key: str, dtype: torch.dtype) -> Any:
        root = self._require_source(key)
        slot = self._slots[key]
        if key == "transformer":
            return loading.load_transformer(root, dtype)
        if key == "vae":
            return loading.load_vae(root, dtype)
        model, tokenizer = (loading.load_t5 if key == "t5" else loading.load_clip)(root, dtype)
        slot.tokenizer = slot.tokenizer or tokenizer
        return model

    def _load_quantized(self, slot: _Slot, prof: Any) -> Any:
        from threedis.engine.quant_cache import QuantCache, default_cache_root, load_quantized
        from threedis.engine.quantize import QuantConfig

        root = self._require_source(slot.key)
        cache = QuantCache(self.cache_root / "quantized" if self.cache_root is not None else default_cache_root())
        with ExitStack() as stack:
            def read_source() -> Any:  # only on a cache miss
                with prof.stage(f"read {slot.key}", weights=str(QUANT_COMPUTE_DTYPE).removeprefix("torch.")):
                    model = self._load_float(slot.key, QUANT_COMPUTE_DTYPE)
                stack.enter_context(prof.stage(f"quantize {slot.key}", scheme=slot.weights))
                return model

            # On a CUDA engine bitsandbytes quantizes layer by layer on the GPU (minutes -> seconds).
            work = self.device if self.device.type == "cuda" else None
            result = load_quantized(loading.model_class(slot.key), root, loading.SUBFOLDERS[slot.key],
                                    QuantConfig(slot.weights, compute_dtype=QUANT_COMPUTE_DTYPE), cache, read_source,
                                    work_device=work)
        slot.cache = "hit" if result.hit else "miss"
        return result.model

    def _load(self, slot: _Slot, load: Callable[[], Any] | None = None) -> None:
        if slot.key not in RUNTIME_MODELS:
            self._load_aux(slot, load)
            return
        prof = self.profiler
        with prof.stage(f"load {slot.key}", weights=slot.weights, device=self._policy(slot).device.value,
                        offload=self._policy(slot).offload.value):
            if slot.weights in _PLAIN:
                model = self._load_float(slot.key, _PLAIN[slot.weights])
                slot.cache = None
            else:
                model = self._load_quantized(slot, prof)
            model.eval().requires_grad_(False)
            slot.model = model
            self._configure(slot)
        slot.loads += 1
        self.loads[slot.key] += 1
        if slot.cache is not None:
            prof.note(f"quantized cache {slot.key}", f"{slot.cache} ({slot.weights})")

    def _load_aux(self, slot: _Slot, load: Callable[[], Any] | None) -> None:
        """An auxiliary model: the caller's loader (it knows the folder and times the load) puts it
        at load_device(); the manager only places it from there."""
        if load is None:
            raise UserError(f"the {slot.key} model is loaded by its stage (threedis.engine.stages.AuxModels), "
                            f"not by name")
        slot.model = load()
        slot.at = self.load_device(slot.key)
        slot.cache = None
        slot.loads += 1
        self.loads[slot.key] += 1
        slot.state = self._between_stages(slot)
        for fn in self._on_load[slot.key]:
            fn(slot.model)

    def _configure(self, slot: _Slot) -> None:
        """Put a freshly loaded (or given) rendering model where its policy keeps it between stages."""
        policy = self._policy(slot)
        model = slot.model
        if slot.key == "vae":
            self._vae_tiling(model)
        slot.at = slot.home
        if self._streamed(slot):
            slot.at = slot.run
            if slot.run.type == "cuda":  # on a CPU engine there is nothing to stream: hooks would only cost
                slot.offloader = apply_group_offload(model, slot.run, policy.offload_group_blocks,
                                                     policy.use_streams)
            else:
                move_model(model, slot.home)
        else:
            move_model(model, slot.home)
        slot.state = self._between_stages(slot)
        for fn in self._on_load[slot.key]:
            fn(model)

    def _streamed(self, slot: _Slot) -> bool:
        policy = self._policy(slot)
        return policy.device is Placement.GPU and policy.offload is Offload.GROUP

    def _between_stages(self, slot: _Slot) -> Residency:
        """The state the profile asks for between stages (moves on a CPU engine are no-ops, states are not)."""
        policy = self._policy(slot)
        if self._streamed(slot):
            return Residency.STREAMED
        if policy.device.freed_after_stage or policy.offload is Offload.MODEL:
            return Residency.PARKED
        return Residency.RESIDENT

    def _vae_tiling(self, vae: Any) -> None:
        if not self.profile.vae_tiling:
            vae.disable_tiling()
            return
        vae.enable_tiling()
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.tile_sample_min_size = VAE_TILE_PX
        vae.tile_latent_min_size = VAE_TILE_PX // factor

    # -- stages ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, key: str, load: Callable[[], Any] | None = None) -> Iterator[Any]:
        """The model, placed for its stage; afterwards parked, freed or left, per profile.

        load: how to load an auxiliary model (stage1, sam2, depth_estimator) if it is not
        in memory; it must put the model at load_device(key). Rendering models load themselves.
        """
        slot = self._slot(key)
        if slot.model is None:
            self._load(slot, load)
        streamed = self._streamed(slot)
        if not streamed and slot.at != slot.run:
            with self.profiler.stage(f"onload {key}", to=str(slot.run)):  # model offload's copy, timed
                slot.model = slot.move(slot.model, slot.run)
            slot.at = slot.run
        slot.state = Residency.IN_STAGE
        try:
            yield slot.model
        finally:
            if self._policy(slot).device.freed_after_stage and not slot.given:
                self.free(key)
            elif slot.model is not None:
                if not streamed and slot.at != slot.home:
                    with self.profiler.stage(f"offload {key}", to=str(slot.home)):
                        slot.model = slot.move(slot.model, slot.home)
                    slot.at = slot.home
                slot.state = self._between_stages(slot)
                if slot.home != slot.run:
                    release_memory(self.device)

    def settle_added_weights(self, key: str, is_added: Callable[[str], bool]) -> int:
        """Place parameters added to a loaded model after its placement (LoRA matrices).

        A model streamed by diffusers' group-offload hooks moves only the parameters its
        groups knew when they were built; added ones would stay in host RAM while their
        block runs on the GPU. They are small, so they stay on the run device for good.
        Returns how many were moved (none unless the model is streamed on CUDA).
        """
        slot = self._slot(key)
        if slot.model is None or not self._streamed(slot) or slot.run.type != "cuda":
            return 0
        moved = 0
        for name, param in slot.model.named_parameters():
            if is_added(name) and param.device != slot.run:
                param.data = param.data.to(slot.run)
                moved += 1
        return moved

    def free(self, key: str) -> None:
        """Drop a model (it reloads at next use) and hand its memory back."""
        slot = self._slot(key)
        if slot.given:
            raise UserError(f"the {key} model was handed in by the caller and cannot be reloaded; not freeing it")
        for fn in self._on_free[key]:
            fn()
        if slot.offloader is not None:
            slot.offloader.remove()
        slot.model = slot.offloader = slot.at = None
        slot.state = Residency.FREED
        release_memory(self.device)

    # -- memory plan ----------------------------------------------------------------------------

    def plan(self, width: int, height: int, num_instances: int, chunk: int = 200,
             extra: Sequence[str] | Mapping[str, Any] = (), stage1_size: tuple[int, int] = (512, 512),
             profile: Profile | None = None) -> Any:
        """The planner's per-stage prediction for this engine's checkpoint (its own configs) and profile.

        extra: auxiliary models this render also runs ("ldm3d_unet", "sam2", ...: see
        planner.models_for), priced from the real models' bundled configs, or a mapping
        key -> config (planner.aux_configs: the config inside a local model folder).
        profile: price these models under another profile (default: the manager's own).
        """
        from threedis.engine.planner import DEFAULT_CONFIGS, measure_model, plan

        models: dict[str, Any] = {k: DEFAULT_CONFIGS[k] for k in RUNTIME_MODELS}
        if self.source is not None:
            models = {k: self.source / loading.SUBFOLDERS[k] for k in RUNTIME_MODELS}
        extra_configs = dict(extra) if isinstance(extra, Mapping) else {k: DEFAULT_CONFIGS[k] for k in extra}
        models.update({k: c for k, c in extra_configs.items() if k not in models})
        if self._sizes is None:
            self._sizes = {}
        for key, config in models.items():  # meta-device counts, once per engine
            if key not in self._sizes:
                self._sizes[key] = measure_model(key, config)
        return plan(profile or self.profile, width, height, num_instances, chunk, models, stage1_size=stage1_size,
                    sizes=self._sizes)

    def check_fits(self, width: int, height: int, num_instances: int, chunk: int = 200,
                   available_gpu_bytes: int | None = None, available_host_bytes: int | None = None,
                   extra: Sequence[str] | Mapping[str, Any] = (),
                   stage1_size: tuple[int, int] = (512, 512)) -> Any:
        """Raise UserError (stage, predicted and available GB, what to change) before loading.

        available_gpu_bytes None: measured on CUDA (free memory plus what this process already
        holds, since the plan counts our own models; at most the per-process memory fraction);
        given, it is checked on any engine.
        available_host_bytes None: on a CPU engine loading from a checkpoint, measured (available
        RAM plus this process's RSS, for the same reason); otherwise host RAM is not checked.
        A CPU engine whose models were all handed in is not checked: it holds them already.
        extra / stage1_size: as in `plan`.
        """
        from threedis.engine.planner import check_fits

        result = self.plan(width, height, num_instances, chunk, extra, stage1_size)
        if self.device.type != "cuda" and available_gpu_bytes is None:  # a CPU engine: its RAM only
            if available_host_bytes is None and self.source is not None:
                available_host_bytes = _available_ram()
            if available_host_bytes is not None:
                check_fits(result, None, int(available_host_bytes))
            return result
        if available_gpu_bytes is None:
            free, total = torch.cuda.mem_get_info(self.device)
            available_gpu_bytes = free + torch.cuda.memory_reserved(self.device)
            fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(self.device)
            available_gpu_bytes = min(available_gpu_bytes, int(fraction * total))  # a capped process
        check_fits(result, int(available_gpu_bytes), available_host_bytes)
        return result


def _available_ram() -> int | None:
    """Host RAM a CPU render can use: what is free plus what this process already holds."""
    try:
        import psutil  # a declared dependency; without it the check is skipped, not the render
    except ImportError:
        return None
    return int(psutil.virtual_memory().available + psutil.Process().memory_info().rss)


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _describe_given(model: Any) -> tuple[str, torch.dtype]:
    """Weights name ("given fp32", "given nf4") and compute dtype of a model handed in."""
    first = next((p for p in model.parameters() if p.is_floating_point() and p.dtype not in _FP8), None)
    dtype = getattr(model, "dtype", None)
    if dtype is None or dtype in _FP8:
        dtype = first.dtype if first is not None else torch.float32
    name = _quantized_format(model) or next((n for n, d in _PLAIN.items() if d == dtype),
                                            str(dtype).removeprefix("torch."))
    return f"given {name}", dtype


def _quantized_format(model: Any) -> str | None:
    """The weights format of an already quantized model (profile names), None for float weights."""
    for module in model.modules():
        kind = type(module).__name__
        if kind == "Linear4bit":
            return str(getattr(module.weight, "quant_type", "nf4"))
        if kind == "Linear8bitLt":
            return "int8"
        qtype = getattr(getattr(module, "weight_qtype", None), "name", None)  # optimum-quanto modules
        if qtype is not None:
            return "quanto-fp8" if qtype.startswith("qfloat8") else f"quanto-{qtype.removeprefix('q')}"
    if any(p.dtype in _FP8 for p in model.parameters()):
        return "fp8"
    return None
