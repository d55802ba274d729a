"""The public engine: load once, render many layouts (contract 6).

An Engine owns its models, its prompt encoder (with its caches) and nothing
else: there is no module-level state, so two engines in one process never see
each other's settings, LoRAs or cached prompts. One render is
stage 1 (layout -> depth, when no depth is given) -> SAM2 masks (when asked) ->
FLUX; the auxiliary models live in `engine.aux` (threedis.engine.stages) only
while their stage runs.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from threedis import __version__
from threedis.engine import loading
from threedis.engine.checks import check_lora_scale, check_render_args, parse_device
from threedis.engine.options import RenderOptions
from threedis.engine.paths import input_file
from threedis.engine.denoise import (
    DenoiseSettings,
    RenderCancelled,
    StepCallback,
    image_processor_for,
    regions_for,
    render_image,
    vae_scale_factor,
)
from threedis.engine.encoding import PromptEncoder
from threedis.engine.errors import UserError
from threedis.engine.layout import Layout
from threedis.engine.loading import FluxComponents
from threedis.engine.notices import records_warnings, warn
from threedis.engine.profiles import Profile, apply_overrides, resolve_profile
from threedis.engine.runtime import ModelManager
from threedis.engine.stages import (
    AuxModels,
    Stage1Options,
    default_stage1,
    raise_if_cancelled,
    run_sam,
    run_stage1,
)
from threedis.engine.tiny_rules import is_tiny
from threedis.kernels.rule import RuleError, Schedule

__all__ = ["DepthResult", "Engine", "RenderCancelled", "RenderOptions", "RenderResult", "Stage1Options", "default_schedule",
           "default_cache_dir"]

DEMO_I2I_STEPS = 4  # the authors' demo default for the image->image switch (SPEC section 3)


@dataclass
class RenderResult:
    """One render: the image, the depth map as used (RGB, layout size), the profiler report and settings.

    masks: per instance, the mask its attention region came from ('L', 255 = inside: the
    user's mask file or SAM2's mask at the output size), None where the box was used.
    stage1_rgb: stage 1's RGB channels (a free preview) when stage 1 made the depth, else None.
    """

    image: Image.Image
    depth: Image.Image
    report: Any
    layout: Layout
    seed: int
    settings: dict = field(default_factory=dict)
    masks: list = field(default_factory=list)
    stage1_rgb: Image.Image | None = None

    def save(self, folder: str | os.PathLike, pictures: bool = True, overwrite: bool = False,
             prefix: str | None = None) -> dict[str, Path]:
        """Write this render's files into `folder` as one set; returns kind -> final path.

        image.png (layout, seed and settings in its PNG metadata), depth.png, layout.png,
        masks, the report files and, with pictures, what the attention rule saw
        (regions.png, attention*.png). The set is written aside and moved in together;
        existing files are never replaced unless overwrite: a clash gives the whole set
        the next free numbered suffix. prefix names the set ("seed-3" -> seed-3.png,
        seed-3-depth.png, ...) instead of image.png, depth.png, ...
        """
        from threedis.engine.outputs import save_result

        return save_result(self, folder, overwrite=overwrite, pictures=pictures, prefix=prefix)


@dataclass
class DepthResult:
    """Engine.depth_from_layout: stage 1's depth ('L') and RGB preview at its size, its report and settings."""

    depth: Image.Image
    rgb: Image.Image
    report: Any
    settings: dict = field(default_factory=dict)


def default_schedule(steps: int) -> Schedule:
    """The demos' schedule scaled to `steps`: masked throughout, I2I for the first 4 steps."""
    return Schedule(steps=steps, hard=steps, i2i=min(DEMO_I2I_STEPS, steps), i2t=steps, t2i=steps, t2t=steps)


def default_cache_dir() -> Path:
    """$THREEDIS_CACHE, else ~/.cache/threedis (threedis.engine.paths.cache_root)."""
    from threedis.engine.paths import cache_root

    return cache_root()


def _unit_range(values: np.ndarray) -> np.ndarray:
    """Finite float64 values -> [0, 1]: as they are when already in [0, 1], else stretched min..max."""
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0.0 and hi <= 1.0:
        return values
    # halved first (exact in binary floats) so a range like -1e308..1e308 does not overflow
    return (values / 2 - lo / 2) / (hi / 2 - lo / 2) if hi > lo else np.zeros_like(values)


def _depth_array_to_uint8(array: np.ndarray) -> np.ndarray:
    """Any numeric depth array -> uint8 [H, W] or [H, W, C], keeping 'near = bright'.

    Integers are read as 8-bit (max <= 255) or 16-bit (max <= 65535) images; anything
    wider (32-bit 'I' PNGs) is stretched over its real range instead of clipped.
    Non-finite values are an error when nothing else is left, else drawn as far (0)
    with a warning: a NaN depth map gives FLUX nothing to follow.
    """
    if array.size == 0:
        raise UserError(f"depth array has shape {array.shape}: it is empty; give an [H, W] depth map")
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo >= 0 and hi <= 65535:
            top = 65535.0 if hi > 255 else 255.0  # 16-bit depth PNGs
            return np.clip(array.astype(np.float64) / top * 255.0, 0, 255).round().astype(np.uint8)
        return (_unit_range(array.astype(np.float64)) * 255.0).round().astype(np.uint8)
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"depth array has dtype {array.dtype}; give numbers (uint8, uint16, int32 or float)")
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        kind = "NaN" if np.isnan(values).all() else "NaN or infinite"
        raise UserError(f"the depth map is all {kind}: it holds no depth; check how it was made")
    if finite.all():
        scaled = _unit_range(values)
    else:
        warn(f"the depth map has {int((~finite).sum())} NaN or infinite values of {values.size}; they are drawn "
             f"as far (black)")
        scaled = np.where(finite, _unit_range(np.where(finite, values, values[finite].min())), 0.0)
    return np.clip(scaled * 255.0, 0, 255).round().astype(np.uint8)


def _warn_if_stretched(size: tuple[int, int], width: int, height: int, what: str = "depth map") -> None:
    """A depth map (or the photo it is estimated from) of another shape is stretched to the layout: the scene
    would be distorted."""
    w, h = size
    if w > 0 and h > 0 and abs((w / h) / (width / height) - 1.0) > 0.01:
        warn(f"the {what} is {w}x{h} but the layout is {width}x{height}: it is stretched to the layout's "
             f"aspect ratio; crop it or give a {what} of the same shape")


def as_depth_image(depth: Any, width: int, height: int, processor: Any, check_aspect: bool = True) -> Image.Image:
    """PIL image / path / numpy array / tensor of any mode or size -> RGB PIL at (width, height).

    Resized with the control image processor's own resampling, so handing the
    result to diffusers gives the same control latents as handing it the original.
    check_aspect: warn when the aspect ratio differs from the layout's (off for stage 1's
    square depth, stretched on purpose as in the authors' demos).
    """
    if depth is None:
        raise UserError("no depth map given; pass depth=... (a depth image, near = bright)")
    if isinstance(depth, (str, os.PathLike)):
        path = input_file(depth, "depth map")
        try:
            with Image.open(path) as img:
                depth = img.copy()
        except Exception as exc:
            raise UserError(f"cannot read depth map {path}: {type(exc).__name__}: {exc}") from None
    if torch.is_tensor(depth):
        if depth.is_complex():
            raise UserError(f"depth tensor has dtype {depth.dtype}; give real numbers")
        depth = depth.detach().cpu()
        depth = (depth.double() if depth.dtype.is_floating_point else depth).numpy()
        if depth.ndim == 4:
            depth = depth[0]
        if depth.ndim == 3 and depth.shape[0] in (1, 3, 4) and depth.shape[-1] not in (1, 3, 4):
            depth = np.moveaxis(depth, 0, -1)  # [C, H, W] -> [H, W, C]
    if isinstance(depth, Image.Image):
        if depth.width == 0 or depth.height == 0:
            raise UserError(f"the depth image is {depth.width}x{depth.height}: it is empty")
        if depth.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            depth = np.asarray(depth)
        else:
            image = depth.convert("RGB")
    if isinstance(depth, np.ndarray):
        array = depth[..., 0] if depth.ndim == 3 and depth.shape[-1] == 1 else depth
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise UserError(f"depth array has shape {depth.shape}; expected [H, W], [H, W, 1|3|4] or [1|3, H, W]")
        image = Image.fromarray(_depth_array_to_uint8(array)).convert("RGB")
    elif not isinstance(depth, Image.Image):
        raise UserError(f"depth must be a PIL image, a file path, a numpy array or a tensor, got {type(depth).__name__}")
    if check_aspect:
        _warn_if_stretched(image.size, width, height)
    return processor.resize(image, height, width)


class EngineComponents:
    """`engine.components`: the models as objects (LoRA, hooks, tests), loaded on first access.

    The runtime (`engine.models`) owns them; what this returns is where the profile keeps
    the model between stages (a model offloaded to host RAM is on the CPU here).
    """

    def __init__(self, models: ModelManager, scheduler: Any, source: Path | None) -> None:
        self._models, self.scheduler, self.source = models, scheduler, source

    @property
    def transformer(self) -> Any:
        return self._models.get("transformer")

    @property
    def vae(self) -> Any:
        return self._models.get("vae")


def _profile_for(profile: str | os.PathLike | Profile, device: torch.device, overrides: dict) -> Profile:
    """A Profile object as given (GPU placements run on the CPU of a CPU engine); a name, a TOML
    path or "auto" resolved for `device` (auto measures free VRAM and says why)."""
    if isinstance(profile, Profile):
        return apply_overrides(profile, overrides or None)
    return resolve_profile(profile, device, overrides or None)


class Engine:
    """FLUX.1-Depth-dev with the 3DIS detail renderer. Reusable: load once, call render() many times."""

    def __init__(
        self,
        components: FluxComponents,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        profile: str | os.PathLike | Profile = "auto",
        cache_dir: str | os.PathLike | None = None,
        overrides: dict | None = None,
        model_id: str | None = None,
        stage1: str | os.PathLike | None = None,
        sam: str | os.PathLike | None = None,
        depth_estimator: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> None:
        from threedis.engine.processor import install_processors
        from threedis.engine.step_cache import StepCacheRunner
        from threedis.kernels.attention import select_backend

        self.device = parse_device(device)
        self.overrides = dict(overrides or {})
        self.profile = _profile_for(profile, self.device, self.overrides)
        self.model_id = model_id or (str(components.source) if components.source is not None else "in-memory")
        cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        text = components.text
        given = {"transformer": components.transformer, "vae": components.vae}
        tokenizers = {}
        if text is not None:
            given.update(clip=text.clip, t5=text.t5)
            tokenizers = {"clip": text.clip_tokenizer, "t5": text.t5_tokenizer}
        # Residency, weight formats, offload and lifetimes of the four rendering models, per profile.
        self.models = ModelManager(self.profile, self.device, components.source, cache_root, given=given,
                                   tokenizers=tokenizers, dtype=dtype)
        self.dtype = self.models.compute_dtype("transformer")
        requested = backend if backend != "auto" else self.profile.attention_backend.value
        try:
            self.backend, self.backend_reason = select_backend(self.models.run_device("transformer"), self.dtype,
                                                               requested)
        except RuleError as err:
            raise UserError(str(err)) from None
        if backend == "auto" and requested != "auto":
            self.backend_reason = f"profile {self.profile.name}: {self.backend_reason}"
        self.step_cache = StepCacheRunner(self.profile.step_cache, self.profile.step_cache_threshold)
        self.loras: list[dict] = []
        self.models.on_load("transformer", install_processors)
        self.models.on_load("transformer", self._reapply_loras)  # a freed transformer comes back with its LoRAs
        self.models.on_free("transformer", self.step_cache.release)
        self.components = EngineComponents(self.models, components.scheduler, components.source)
        prompt_cache = cache_root / "prompts" if self.profile.text_encoder_cache else None  # profile decides
        self.prompts = PromptEncoder(components.source, self.device, self.dtype, cache_dir=prompt_cache,
                                     models=self.models)
        # Where stage 1, SAM2 and Depth Anything are; the manager loads and places each per profile.
        self.aux = AuxModels(stage1=stage1, sam=sam, depth=depth_estimator, local_files_only=local_files_only,
                             models=self.models)
        self._lock = threading.Lock()  # one render at a time per engine: the scheduler copy and models are shared

    # -- construction ----------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike = loading.DEFAULT_MODEL_ID,
        profile: str | os.PathLike | Profile = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = False,
        backend: str = "auto",
        cache_dir: str | os.PathLike | None = None,
        overrides: dict | None = None,
        stage1: str | os.PathLike | None = None,
        sam: str | os.PathLike | None = None,
        depth_estimator: str | os.PathLike | None = None,
    ) -> "Engine":
        """Check the checkpoint and the memory plan now; load each model at its first use.

        profile: "auto" (picked from free VRAM; the reason is in every report and settings),
        a built-in name ("12gb"), a TOML file, or a Profile object (its GPU placements run on
        the CPU of a CPU engine). overrides: dotted profile keys ({"transformer.weights":
        "nf4"}). dtype: one float dtype for every model instead of the profile's formats
        (exact comparisons). backend: "auto" takes the profile's attention backend.
        Models load lazily inside the first render (its report has "load <model>" stages);
        the text encoders only when a prompt is not in the prompt cache.
        stage1 / sam / depth_estimator say where the auxiliary models are; nothing of them is
        loaded here. stage1: None (renders need a depth map), "auto" (the authors' release)
        or an LDM3D-4c folder / hub id holding unet_0901.ckpt and layout_adapter.ckpt.
        sam / depth_estimator: a folder or hub id; None means the default id
        (facebook/sam2.1-hiera-large, depth-anything/Depth-Anything-V2-Large-hf).
        """
        device = parse_device(device)
        root = loading.resolve_checkpoint(path_or_id, local_files_only)
        loading.check_checkpoint(root)
        components = FluxComponents(transformer=None, vae=None, scheduler=loading.load_scheduler(root), source=root)
        engine = cls(components, device=device, dtype=dtype, backend=backend, profile=profile, cache_dir=cache_dir,
                     overrides=overrides, model_id=str(root) if Path(os.fspath(path_or_id)).expanduser().is_dir()
                     else os.fspath(path_or_id), stage1=stage1, sam=sam,
                     depth_estimator=depth_estimator, local_files_only=local_files_only)
        if engine.device.type == "cuda":  # the smallest useful render must fit before anything loads
            engine.models.check_fits(512, 512, 0, 200)
        return engine

    @classmethod
    def from_components(cls, components: FluxComponents, **kwargs: Any) -> "Engine":
        """Wrap models already in memory (tests, notebooks); kwargs as for the constructor."""
        return cls(components, **kwargs)

    # -- LoRA ------------------------------------------------------------------

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> str:
        """Add a FLUX LoRA (diffusers or kohya keys) to this engine's transformer; returns its adapter name."""
        from threedis.engine.lora import load_lora

        scale = check_lora_scale(scale)  # before the transformer is touched
        name = load_lora(self.components.transformer, path, scale=scale, adapter_name=f"lora{len(self.loras)}")
        self.models.settle_added_weights("transformer", lambda param: ".lora_" in param)
        self.loras.append({"path": str(Path(path).expanduser().resolve()), "scale": float(scale), "name": name})
        return name

    def unload_loras(self) -> None:
        """Remove every LoRA loaded with `load_lora` (a desktop app's reset): later renders are the plain model's."""
        from threedis.engine.lora import unload_loras

        transformer = self.models.loaded("transformer")  # a freed transformer reloads without them
        if transformer is not None:
            unload_loras(transformer)
        self.loras.clear()

    def _reapply_loras(self, transformer: Any) -> None:
        """Load this engine's LoRAs into a freshly loaded transformer (profiles that free it between renders)."""
        from threedis.engine.lora import load_lora

        for item in self.loras:
            load_lora(transformer, item["path"], scale=item["scale"], adapter_name=item["name"])
        if self.loras:
            self.models.settle_added_weights("transformer", lambda param: ".lora_" in param)

    # -- rendering -------------------------------------------------------------

    def _vae_view(self) -> Any:
        """The VAE's config as `.config` (loads nothing): enough for sizes and the image processor."""
        return SimpleNamespace(config=self.models.config("vae"))

    def _check_size(self, layout: Layout) -> None:
        factor = 2 * vae_scale_factor(self._vae_view())
        if layout.width % factor or layout.height % factor:
            raise UserError(
                f"layout size {layout.width}x{layout.height} must be a multiple of {factor} on both sides"
            )

    def depth_from_layout(self, layout: Layout, seed: int = 0, stage1: Stage1Options | None = None,
                          on_stage1_step: Callable[[int, int], None] | None = None,
                          cancel: threading.Event | None = None) -> DepthResult:
        """Stage 1 alone: the layout's depth map, so a user can see and keep it before rendering on it.

        The depth ('L', near = bright) and RGB preview are at stage1.size (render() stretches them
        to the layout size with FLUX's control resampling); stage 1 is freed afterwards.
        """
        from threedis.engine.checks import check_callback, check_cancel, check_seed
        from threedis.engine.profiler import Profiler

        if not isinstance(layout, Layout):
            raise UserError(f"layout must be a threedis Layout (Layout.load(path)), got {type(layout).__name__}")
        check_seed(seed)
        check_cancel(cancel)
        check_callback(on_stage1_step, "on_stage1_step")
        if stage1 is not None and not isinstance(stage1, Stage1Options):
            raise UserError(f"stage1 must be a threedis Stage1Options, got {type(stage1).__name__}")
        spec = self.aux.spec("stage1")  # no stage 1 configured: say so before any work
        stage1 = stage1 if stage1 is not None else default_stage1(spec)
        if stage1.seed is None:
            stage1 = replace(stage1, seed=seed)
        with self._lock:
            prof = Profiler(device=self.device)
            try:
                made = run_stage1(self.aux, layout, stage1, True, prof, on_stage1_step, cancel)
            finally:
                self.aux.free()
            report = prof.report()
        settings = self._depth_settings(stage1, made)
        return DepthResult(depth=made.depth, rgb=made.rgb, report=report, settings=settings)

    def plan(self, width: int, height: int, num_instances: int, *, stage1: bool = False, sam: bool = False,
             depth_from_photo: bool = False, stage1_size: tuple[int, int] = (512, 512), chunk: int = 200,
             profile: str | os.PathLike | Profile | None = None) -> Any:
        """The memory planner's prediction for a render on this engine's own models, before anything loads.

        A local checkpoint (the tiny ones included) is priced from its own configs, so the plan
        is what this engine would hold, not what the real FLUX.1-Depth-dev would. profile: a
        built-in name, TOML file or Profile to price instead of the engine's (as `threedis plan
        --profile`). Returns the planner's Plan (`.to_dict()` is `threedis plan --json`).
        """
        from threedis.engine.planner import STAGE2_MODELS, models_for
        from threedis.engine.profiles import load_profile

        keys = [k for k in models_for(stage1=stage1, sam2=sam, depth_estimator=depth_from_photo)
                if k not in STAGE2_MODELS]
        other = load_profile(profile) if isinstance(profile, (str, os.PathLike)) else profile
        return self.models.plan(width, height, num_instances, chunk, extra=self._aux_configs(keys),
                                stage1_size=tuple(stage1_size), profile=other)

    def _aux_configs(self, keys: list[str]) -> dict[str, Any]:
        """Config per auxiliary model: the one in its local folder, else the real model's (stage 1 unset too)."""
        from threedis.engine.planner import AUX_FOLDERS, aux_configs

        folders: dict[str, str | None] = {}
        for key in keys:
            kind = AUX_FOLDERS[key][0]
            try:
                folders[kind] = self.aux.spec(kind)
            except UserError:  # no stage 1 set: priced as the authors' release
                folders[kind] = None
        return aux_configs(keys, folders)

    def check_fits(self, width: int, height: int, num_instances: int = 0, stage1: Stage1Options | None = None,
                   sam: bool = False, chunk: int = 200, photo: bool = False) -> None:
        """Raise UserError now if a render of this size would not fit the memory plan; nothing loads.

        The check every render makes first (VRAM on CUDA, host RAM on CPU, with this engine's
        profile): stage1, the stage-1 settings when stage 1 makes the depth (None: a depth map
        is given); sam, whether SAM2 runs; photo, whether the depth estimator is priced too. A
        batch asks it before choosing what to keep loaded between items.
        """
        from threedis.engine.planner import STAGE2_MODELS, models_for

        keys = [k for k in models_for(stage1=stage1 is not None, sam2=bool(sam), depth_estimator=bool(photo))
                if k not in STAGE2_MODELS]
        self.models.check_fits(width, height, num_instances, chunk, extra=self._aux_configs(keys),
                               stage1_size=stage1.size if stage1 is not None else (512, 512))

    def loaded_models(self) -> list[str]:
        """The models in memory right now (profile keys), e.g. for a status display."""
        return sorted(key for key, info in self.models.placement().items() if info.get("on") is not None)

    def depth_from_image(self, image: Any, size: tuple[int, int] | None = None) -> Image.Image:
        """Depth map of a photo with Depth Anything V2 ('L', near = bright) at `size` (w, h) or the photo's.

        Use it instead of stage 1 when a reference photo exists; the estimator is loaded
        for this call and freed afterwards.
        """
        from threedis.engine.depth_estimation import open_image

        rgb = open_image(image, "photo")
        with self._lock:
            return self.aux.run("depth", lambda estimator: estimator.estimate(rgb, size))

    @records_warnings
    def render(
        self,
        layout: Layout,
        depth: Any = None,
        seed: int = 0,
        steps: int = 20,
        *,
        guidance: float = 10.0,
        schedule: Schedule | None = None,
        sam: bool = False,
        depth_from_photo: Any = None,
        stage1: Stage1Options | None = None,
        options: RenderOptions | None = None,
        on_step: StepCallback | None = None,
        on_stage1_step: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> RenderResult:
        """Render `layout`: depth (given, from a photo, or stage 1) -> SAM2 masks (when sam) -> FLUX.

        depth: a depth map (PIL image, path, array or tensor; near = bright). depth_from_photo:
        a photo whose depth Depth Anything V2 estimates instead (a photo of another aspect ratio
        than the layout's is stretched, with a warning). With neither, stage 1 makes the depth at
        stage1.size (Stage1Options; without one, stages.default_stage1: 512 x 512 for 30 steps as
        the demos, 64 x 64 for 4 on a tiny checkpoint; seed = this render's seed) and it is
        stretched to the layout size. settings["depth"] records
        which source was used. sam=True replaces the box of every instance without a user
        mask by SAM2's mask of that box on the (resized) depth map. options: the rarely
        changed knobs (RenderOptions). on_stage1_step(done, total) and
        on_step(done, total, preview) report progress; setting `cancel` stops at the next
        step or stage boundary with RenderCancelled, with every auxiliary model freed.
        """
        from threedis.engine.profiler import Profiler

        options = options if options is not None else RenderOptions()
        if not isinstance(options, RenderOptions):
            raise UserError(f"options must be a threedis RenderOptions, got {type(options).__name__}")
        if stage1 is not None and not isinstance(stage1, Stage1Options):
            raise UserError(f"stage1 must be a threedis Stage1Options, got {type(stage1).__name__}")
        check_render_args(steps=steps, seed=seed, guidance=guidance, schedule=schedule, chunk=options.chunk,
                          cancel=cancel, on_step=on_step, on_stage1_step=on_stage1_step)
        self._check_render_args(layout, steps, schedule)
        if depth is not None and depth_from_photo is not None:
            raise UserError("give either depth= or depth_from_photo=, not both")
        chunk, append_instances = options.chunk, options.append_instances
        schedule = schedule or default_schedule(steps)
        depth_source: dict[str, Any] = {"source": "user"}
        depth_image = None
        if depth_from_photo is not None:
            from threedis.engine.depth_estimation import open_image

            rgb = open_image(depth_from_photo, "photo")
            _warn_if_stretched(rgb.size, layout.width, layout.height, "photo")  # its depth comes at the layout size
            depth_image = self._depth_image(layout, self.depth_from_image(rgb, size=(layout.width, layout.height)))
            photo = depth_from_photo if isinstance(depth_from_photo, (str, os.PathLike)) else None
            depth_source = {"source": "photo", "photo": None if photo is None else os.fspath(photo),
                            "model": self.aux.spec("depth")}
        elif depth is not None:
            depth_image = self._depth_image(layout, depth)
        if depth_image is None:
            spec = self.aux.spec("stage1")  # no stage 1 configured: say so before any work
            stage1 = stage1 if stage1 is not None else default_stage1(spec)
            if stage1.seed is None:
                stage1 = replace(stage1, seed=seed)
        else:
            stage1 = None
        settings = DenoiseSettings(steps=steps, guidance=float(guidance), schedule=schedule, backend=self.backend,
                                   permute_tokens=options.permute_tokens, preview=options.preview)
        with self._lock:
            # before anything of this render loads: VRAM on CUDA, host RAM on CPU (runtime.check_fits)
            self.check_fits(layout.width, layout.height, len(layout.instances), stage1=stage1, sam=bool(sam),
                            chunk=chunk)
            prof = Profiler(device=self.device)
            prof.note("profile", self.profile.name)
            prof.note("profile origin", self.profile.origin)
            prof.note("attention backend", self.backend)
            prof.note("attention backend reason", self.backend_reason)
            try:
                stage1_result = None
                if stage1 is not None:
                    stage1_result = run_stage1(self.aux, layout, stage1, append_instances, prof,
                                               on_stage1_step, cancel)
                    depth_image = self._depth_image(layout, stage1_result.depth, check_aspect=False)
                raise_if_cancelled(cancel, "after stage 1, before the masks")
                masks, mask_info = self._masks(layout, depth_image, sam, prof)
                raise_if_cancelled(cancel, "before stage 2")
                with self.models.bind(prof):
                    image, text = self._stage2(layout, depth_image, masks, seed, chunk, append_instances, settings,
                                               prof, on_step, cancel)
            finally:
                self.aux.free()
            prof.note("placement", self.models.placement())
            prof.note("step cache", self.step_cache.describe())
            report = prof.report()
        info = self._settings(steps, guidance, schedule, options, text)
        info["depth"] = self._depth_settings(stage1, stage1_result) if stage1 is not None else depth_source
        info.update(mask_info)
        return RenderResult(image=image, depth=depth_image, report=report, layout=layout, seed=int(seed),
                            settings=info, masks=masks,
                            stage1_rgb=stage1_result.rgb if stage1_result is not None else None)

    # -- the parts of a render -------------------------------------------------

    def _check_render_args(self, layout: Layout, steps: int, schedule: Schedule | None) -> None:
        if not isinstance(layout, Layout):
            raise UserError(f"layout must be a threedis Layout (Layout.load(path)), got {type(layout).__name__}")
        self._check_size(layout)  # steps and schedule: threedis.engine.checks

    def _depth_image(self, layout: Layout, depth: Any, check_aspect: bool = True) -> Image.Image:
        """Any depth input -> RGB at the layout size, resized as FLUX's control processor resizes."""
        return as_depth_image(depth, layout.width, layout.height, image_processor_for(self._vae_view()),
                              check_aspect=check_aspect)

    def _masks(self, layout: Layout, depth_image: Image.Image, sam: bool,
               prof: Any) -> tuple[list[Image.Image | None], dict]:
        """Per-instance masks, plus settings saying whether SAM ran and where each mask came from.

        User masks (the layout's mask files) win and skip SAM; SAM2 runs only when asked
        and some instance has no user mask; an empty SAM mask falls back to the box.
        """
        masks = layout.load_masks()
        sources = ["box" if m is None else "user" for m in masks]
        ran = bool(sam) and "box" in sources
        if ran:
            if is_tiny(self.aux.spec("sam")):
                warn(f"SAM2 is a tiny random-weight checkpoint ({self.aux.spec('sam')}): its masks are random "
                     f"shapes, not the instances (see mask-*.png, regions.png); for masks that follow the "
                     f"instances use the real SAM2, or leave SAM off")
            found = run_sam(self.aux, layout, depth_image, masks, prof)
            for i, mask in enumerate(found):
                if mask is not None:
                    masks[i], sources[i] = mask, "sam"
        elif sam:
            prof.note("sam", "skipped: every instance has a user mask" if masks else "skipped: no instances")
        return masks, {"sam": {"ran": ran, "model": self.aux.spec("sam") if ran else None}, "masks": sources}

    def _stage2(self, layout: Layout, depth_image: Image.Image, masks: list, seed: int, chunk: int,
                append_instances: bool, settings: DenoiseSettings, prof: Any, on_step: StepCallback | None,
                cancel: threading.Event | None) -> tuple[Image.Image, Any]:
        """FLUX: encode the prompts, denoise with the rule over the instance regions, decode."""
        with prof.stage("encode", prompts=len(layout.instances) + 1, chunk=chunk):
            loads_before = dict(self.prompts.loads)
            text = self.prompts.encode(layout.prompts(append_instances), chunk)
        prof.note("text encoders loaded", {k: self.prompts.loads[k] - loads_before[k] for k in loads_before})
        factor = 2 * vae_scale_factor(self._vae_view())
        grid = (layout.height // factor, layout.width // factor)
        regions = regions_for(layout.boxes, masks, grid)  # mask_regions where a mask is given, else the box
        scheduler = type(self.components.scheduler).from_config(self.components.scheduler.config)
        # Each model arrives for its stage (text encoders have left by now) and leaves per profile.
        image = render_image(
            None, None, scheduler, text, depth_image, regions, layout.width, layout.height, seed, settings, prof,
            on_step=on_step, cancel=cancel, device=self.models.run_device("transformer"), use=self.models.use,
            step_cache=self.step_cache,
        )
        return image, text

    def _depth_settings(self, stage1: Stage1Options, result: Any) -> dict:
        return {"source": "stage1", "model": self.aux.spec("stage1"), **stage1.to_dict(),
                "prompt": result.settings.get("prompt")}

    def _settings(self, steps: int, guidance: float, schedule: Schedule, options: RenderOptions, text: Any) -> dict:
        return {
            "steps": steps,
            "guidance": float(guidance),
            "schedule": asdict(schedule),
            "chunk": options.chunk,
            "append_instances": options.append_instances,
            "permute_tokens": options.permute_tokens,
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "profile": self.profile.name,
            "profile_origin": self.profile.origin,
            "vae_tiling": bool(self.profile.vae_tiling),  # tiled decoding changes the pixels of large images
            "overrides": self.overrides,
            "placement": self.models.placement(),
            "step_cache": self.step_cache.describe(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "model": self.model_id,
            "loras": [dict(item) for item in self.loras],
            "truncated_prompts": text.truncated,
            "version": __version__,
        }
