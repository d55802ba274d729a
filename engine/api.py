"""The public engine: load once, render many layouts (contract 6).

An Engine owns its models, its prompt encoder (with its caches) and nothing
else: there is no module-level state, so two engines in one process never see
each other's settings, LoRAs or cached prompts.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from threedis import __version__
from threedis.engine import loading
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
from threedis.kernels.rule import RuleError, Schedule

__all__ = ["Engine", "RenderCancelled", "RenderResult", "default_schedule", "default_cache_dir"]

DEMO_I2I_STEPS = 4  # the authors' demo default for the image->image switch (SPEC section 3)


@dataclass
class RenderResult:
    """One render: the image, the depth map as used (RGB, layout size), the profiler report and settings."""

    image: Image.Image
    depth: Image.Image
    report: Any
    layout: Layout
    seed: int
    settings: dict = field(default_factory=dict)


def default_schedule(steps: int) -> Schedule:
    """The demos' schedule scaled to `steps`: masked throughout, I2I for the first 4 steps."""
    return Schedule(steps=steps, hard=steps, i2i=min(DEMO_I2I_STEPS, steps), i2t=steps, t2i=steps, t2t=steps)


def default_cache_dir() -> Path:
    root = os.environ.get("THREEDIS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "threedis"


def _depth_array_to_uint8(array: np.ndarray) -> np.ndarray:
    """Any numeric depth array -> uint8 [H, W] or [H, W, C], keeping 'near = bright'."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        top = 65535.0 if array.max(initial=0) > 255 else 255.0  # 16-bit depth PNGs
        return np.clip(array.astype(np.float64) / top * 255.0, 0, 255).round().astype(np.uint8)
    values = array.astype(np.float64)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    if lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    else:  # unnormalised floats: stretch to the full range
        scaled = (values - lo) / max(hi - lo, 1e-12) * 255.0
    return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)


def as_depth_image(depth: Any, width: int, height: int, processor: Any) -> Image.Image:
    """PIL image / path / numpy array / tensor of any mode or size -> RGB PIL at (width, height).

    Resized with the control image processor's own resampling, so handing the
    result to diffusers gives the same control latents as handing it the original.
    """
    if depth is None:
        raise UserError("no depth map given; pass depth=... (stage 1 layout->depth lands separately)")
    if isinstance(depth, (str, os.PathLike)):
        path = Path(depth)
        if not path.is_file():
            raise UserError(f"depth map not found: {path}")
        try:
            with Image.open(path) as img:
                depth = img.copy()
        except Exception as exc:
            raise UserError(f"cannot read depth map {path}: {type(exc).__name__}: {exc}") from None
    if torch.is_tensor(depth):
        depth = depth.detach().float().cpu().numpy()
        if depth.ndim == 4:
            depth = depth[0]
        if depth.ndim == 3 and depth.shape[0] in (1, 3, 4) and depth.shape[-1] not in (1, 3, 4):
            depth = np.moveaxis(depth, 0, -1)  # [C, H, W] -> [H, W, C]
    if isinstance(depth, Image.Image):
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
    return processor.resize(image, height, width)


class Engine:
    """FLUX.1-Depth-dev with the 3DIS detail renderer. Reusable: load once, call render() many times."""

    def __init__(
        self,
        components: FluxComponents,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        profile: str = "auto",
        cache_dir: str | os.PathLike | None = None,
        overrides: dict | None = None,
        model_id: str | None = None,
    ) -> None:
        from threedis.engine.processor import install_processors
        from threedis.kernels.attention import select_backend

        self.components = components
        self.device = torch.device(device) if device is not None else loading.default_device()
        self.dtype = dtype or loading.default_dtype(self.device)
        self.profile = profile
        self.overrides = dict(overrides or {})
        self.model_id = model_id or (str(components.source) if components.source is not None else "in-memory")
        try:
            self.backend, self.backend_reason = select_backend(self.device, self.dtype, backend)
        except RuleError as err:
            raise UserError(str(err)) from None
        install_processors(components.transformer)
        cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.prompts = PromptEncoder(
            components.source, self.device, self.dtype, cache_dir=cache_root / "prompts", text=components.text
        )
        self.loras: list[dict] = []
        self._lock = threading.Lock()  # one render at a time per engine: the scheduler copy and models are shared

    # -- construction ----------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike = loading.DEFAULT_MODEL_ID,
        profile: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = False,
        backend: str = "auto",
        cache_dir: str | os.PathLike | None = None,
        overrides: dict | None = None,
    ) -> "Engine":
        """Load transformer, VAE and scheduler now; CLIP and T5 only when a prompt is not cached."""
        device = torch.device(device) if device is not None else loading.default_device()
        dtype = dtype or loading.default_dtype(device)
        components = loading.load_components(path_or_id, dtype=dtype, device=device, local_files_only=local_files_only)
        return cls(components, device=device, dtype=dtype, backend=backend, profile=profile, cache_dir=cache_dir,
                   overrides=overrides, model_id=os.fspath(path_or_id))

    @classmethod
    def from_components(cls, components: FluxComponents, **kwargs: Any) -> "Engine":
        """Wrap models already in memory (tests, notebooks); kwargs as for the constructor."""
        return cls(components, **kwargs)

    # -- LoRA ------------------------------------------------------------------

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> str:
        """Add a FLUX LoRA (diffusers or kohya keys) to this engine's transformer; returns its adapter name."""
        from threedis.engine.lora import load_lora

        name = load_lora(self.components.transformer, path, scale=scale, adapter_name=f"lora{len(self.loras)}")
        self.loras.append({"path": os.fspath(path), "scale": float(scale), "name": name})
        return name

    # -- rendering -------------------------------------------------------------

    def _check_size(self, layout: Layout) -> None:
        factor = 2 * vae_scale_factor(self.components.vae)
        if layout.width % factor or layout.height % factor:
            raise UserError(
                f"layout size {layout.width}x{layout.height} must be a multiple of {factor} on both sides"
            )

    def render(
        self,
        layout: Layout,
        depth: Any = None,
        seed: int = 0,
        steps: int = 20,
        guidance: float = 10.0,
        schedule: Schedule | None = None,
        chunk: int = 200,
        append_instances: bool = True,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        permute_tokens: bool = False,
        preview: bool = False,
    ) -> RenderResult:
        """Render `layout` over `depth`. on_step(done, total, preview) runs after every step;
        setting `cancel` stops at the next step boundary with RenderCancelled."""
        from threedis.engine.profiler import Profiler

        if not isinstance(layout, Layout):
            raise UserError(f"layout must be a threedis Layout (Layout.load(path)), got {type(layout).__name__}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UserError(f"steps must be a positive whole number, got {steps!r}")
        schedule = schedule or default_schedule(steps)
        if schedule.steps != steps:
            raise UserError(f"schedule.steps = {schedule.steps} but steps = {steps}; make them equal")
        self._check_size(layout)
        vae = self.components.vae
        depth_image = as_depth_image(depth, layout.width, layout.height, image_processor_for(vae))
        settings = DenoiseSettings(steps=steps, guidance=float(guidance), schedule=schedule, backend=self.backend,
                                   permute_tokens=bool(permute_tokens), preview=bool(preview))
        with self._lock:
            prof = Profiler(device=self.device)
            prof.note("attention backend", self.backend)
            prof.note("attention backend reason", self.backend_reason)
            with prof.stage("encode", prompts=len(layout.instances) + 1, chunk=chunk):
                loads_before = dict(self.prompts.loads)
                text = self.prompts.encode(layout.prompts(append_instances), chunk)
            prof.note("text encoders loaded", {k: self.prompts.loads[k] - loads_before[k] for k in loads_before})
            factor = 2 * vae_scale_factor(vae)
            grid = (layout.height // factor, layout.width // factor)
            regions = regions_for(layout.boxes, layout.load_masks(), grid)
            scheduler = type(self.components.scheduler).from_config(self.components.scheduler.config)
            image = render_image(
                self.components.transformer, vae, scheduler, text, depth_image, regions, layout.width,
                layout.height, seed, settings, prof, on_step=on_step, cancel=cancel, device=self.device,
            )
            report = prof.report()
        info = {
            "steps": steps,
            "guidance": float(guidance),
            "schedule": asdict(schedule),
            "chunk": chunk,
            "append_instances": bool(append_instances),
            "permute_tokens": bool(permute_tokens),
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "profile": self.profile,
            "overrides": self.overrides,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "model": self.model_id,
            "loras": [dict(item) for item in self.loras],
            "truncated_prompts": text.truncated,
            "version": __version__,
        }
        return RenderResult(image=image, depth=depth_image, report=report, layout=layout, seed=int(seed), settings=info)
