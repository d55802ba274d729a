"""The stages around the FLUX render: layout -> depth (stage 1), SAM2 masks, depth from a photo.

Why a module of its own: each auxiliary model is needed for a moment of a render
and never again in it. `AuxModels` remembers *where* each one is (a folder or hub
id), loads it only when a stage asks, and frees it as soon as that stage ends, so
stage 1 (~1B parameters) and SAM2 are gone before FLUX's transformer needs the
memory. At most one auxiliary model is alive at a time; between stages
`AuxModels.live` is empty and nothing else on the engine references them.

Order inside a render: stage 1 -> SAM -> stage 2 (encode, steps, decode).
"""

from __future__ import annotations

import gc
import os
import threading
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, TypeVar

import torch
from PIL import Image

from threedis.engine.denoise import RenderCancelled
from threedis.engine.errors import UserError
from threedis.engine.profiles import Placement, Profile
from threedis.engine.sizes import parse_size

__all__ = [
    "AUX_KINDS",
    "PROFILE_KEYS",
    "AuxModels",
    "Stage1Options",
    "mask_images",
    "raise_if_cancelled",
    "run_sam",
    "run_stage1",
]

AUX_KINDS = ("stage1", "sam", "depth")
# The profile entries (profiles/*.toml) that govern each auxiliary model.
PROFILE_KEYS: dict[str, tuple[str, ...]] = {
    "stage1": ("ldm3d_unet", "ldm3d_vae", "ldm3d_text"), "sam": ("sam2",), "depth": ("depth_estimator",)}
_FLOAT_WEIGHTS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

T = TypeVar("T")


def raise_if_cancelled(cancel: threading.Event | None, where: str) -> None:
    """Stop between stages with the same error the denoising loop raises."""
    if cancel is not None and cancel.is_set():
        raise RenderCancelled(f"render cancelled {where}")


def _whole(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{name} must be a whole number >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class Stage1Options:
    """Stage 1's settings for one render (defaults: the authors' demos, SPEC section 6)."""

    steps: int = 30
    guidance: float = 6.5
    migc_steps: int = 16
    phase_augment: bool = True
    size: tuple[int, int] = (512, 512)  # (width, height) of the generated depth, before resizing to the layout
    seed: int | None = None  # None: the render's seed
    negative_prompt: str | None = None  # None: the demos' (stage1.pipeline.DEFAULT_NEGATIVE)

    def __post_init__(self) -> None:
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise UserError(f"stage1_negative_prompt must be text, got {self.negative_prompt!r}")
        _whole("stage1_steps", self.steps, 1)
        _whole("migc_steps", self.migc_steps, 0)
        if self.seed is not None:
            _whole("stage1_seed", self.seed, 0)
        object.__setattr__(self, "size", parse_size(self.size))
        object.__setattr__(self, "guidance", float(self.guidance))
        object.__setattr__(self, "phase_augment", bool(self.phase_augment))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["size"] = list(self.size)
        return out


def _check_profile(profile: Profile) -> None:
    """The auxiliary models are small and load through diffusers/transformers in a float format."""
    for key in (k for keys in PROFILE_KEYS.values() for k in keys):
        weights = profile.policy(key).weights.value
        if weights not in _FLOAT_WEIGHTS:
            raise UserError(f"profile {profile.name!r}: {key}.weights = {weights!r} is not supported for the "
                            f"stage-1, SAM2 and depth models (small, loaded for one stage); use fp16, bf16 or fp32")


class AuxModels:
    """Where stage 1, SAM2 and the depth estimator are; loads one on demand and frees it after use.

    specs: "stage1" None (no stage 1: renders need a depth map), "auto" (the authors'
    release: LDM3D-4c base + their UNet and adapter) or a base folder / hub id holding
    the release's two files; "sam" and "depth" a folder or hub id, None for the default id.
    profile: the engine's profile; its ldm3d_unet / ldm3d_vae / ldm3d_text / sam2 /
    depth_estimator entries set each model's float format and device ("cpu" keeps it on
    the CPU, the GPU placements use `device`). None: each loader's default (fp16 for
    stage 1 and bf16 for the others on CUDA, fp32 on the CPU).
    `loaders` maps kind -> callable(spec) returning the loaded model; an instance
    attribute, so a caller can wrap or replace one (quantized loads, test stubs).
    """

    def __init__(self, stage1: Any = None, sam: Any = None, depth: Any = None,
                 device: torch.device | str = "cpu", local_files_only: bool = False,
                 profile: Profile | None = None) -> None:
        self.specs: dict[str, Any] = {"stage1": stage1, "sam": sam, "depth": depth}
        self.device = torch.device(device)
        self.local_files_only = bool(local_files_only)
        if profile is not None:
            _check_profile(profile)
        self.profile = profile
        self.loaders: dict[str, Callable[[Any], Any]] = {
            "stage1": self._load_stage1, "sam": self._load_sam, "depth": self._load_depth}
        self.live: dict[str, Any] = {}  # kind -> model, only while its stage runs

    # -- where the models are --------------------------------------------------

    def spec(self, kind: str) -> str:
        """The folder / hub id `kind` loads from, defaults filled in."""
        from threedis.engine.depth_estimation import DEFAULT_DEPTH_MODEL
        from threedis.engine.sam_masks import DEFAULT_SAM_MODEL
        from threedis.engine.stage1 import DEFAULT_BASE_ID

        value = self.specs[kind]
        if kind == "stage1":
            if value is None:
                raise UserError("no depth map given and no stage-1 model set: pass depth=... to render, or load the "
                                "engine with stage1='auto' (the authors' release) or stage1=PATH (an LDM3D-4c "
                                "folder holding unet_0901.ckpt and layout_adapter.ckpt)")
            return DEFAULT_BASE_ID if value == "auto" else os.fspath(value)
        if value is None:
            return DEFAULT_SAM_MODEL if kind == "sam" else DEFAULT_DEPTH_MODEL
        return os.fspath(value)

    def describe(self) -> dict[str, str | None]:
        """Specs as given (None = not set / default), for settings and reports."""
        return {k: (None if v is None else os.fspath(v)) for k, v in self.specs.items()}

    def placement(self, key: str) -> tuple[torch.device, torch.dtype | None]:
        """(device, dtype) of the profile entry `key` (e.g. "sam2"); dtype None = the loader's default."""
        if self.profile is None:
            return self.device, None
        policy = self.profile.policy(key)
        device = torch.device("cpu") if policy.device is Placement.CPU else self.device
        return device, _FLOAT_WEIGHTS[policy.weights.value]

    def _formats(self, kind: str) -> dict[str, str]:
        """For the report: "<profile key>": "<weights>@<device>" of each part of `kind`."""
        if self.profile is None or kind not in PROFILE_KEYS:
            return {}
        out = {}
        for key in PROFILE_KEYS[kind]:
            device, _ = self.placement("ldm3d_unet" if kind == "stage1" else key)  # stage 1: one device
            out[key] = f"{self.profile.policy(key).weights.value}@{device.type}"
        return out

    # -- default loaders ---------------------------------------------------------

    def _load_stage1(self, spec: str) -> Any:
        from threedis.engine.stage1 import Stage1Pipeline

        # One device for the whole pipeline (the UNet's entry); per-part float formats.
        device, unet_dtype = self.placement("ldm3d_unet")
        return Stage1Pipeline.from_pretrained(spec, device=device, dtype=unet_dtype,
                                              vae_dtype=self.placement("ldm3d_vae")[1],
                                              text_encoder_dtype=self.placement("ldm3d_text")[1],
                                              local_files_only=self.local_files_only)

    def _load_sam(self, spec: str) -> Any:
        from threedis.engine.sam_masks import SamMasker

        device, dtype = self.placement("sam2")
        return SamMasker.from_pretrained(spec, device=device, dtype=dtype, local_files_only=self.local_files_only)

    def _load_depth(self, spec: str) -> Any:
        from threedis.engine.depth_estimation import DepthEstimator

        device, dtype = self.placement("depth_estimator")
        return DepthEstimator.from_pretrained(spec, device=device, dtype=dtype,
                                              local_files_only=self.local_files_only)

    # -- load, use, free ----------------------------------------------------------

    def run(self, kind: str, use: Callable[[Any], T], profiler: Any = None) -> T:
        """Load `kind`, return use(model), and free the model whatever happens.

        On an error the traceback's finished frames are cleared, so the exception a
        caller keeps (pytest.raises, a UI's error log) does not keep the model alive.
        """
        if kind not in self.loaders:
            raise ValueError(f"unknown auxiliary model {kind!r}; expected one of {AUX_KINDS}")
        self.free()  # one auxiliary model at a time
        try:
            spec = self.spec(kind)
            if profiler is not None:
                with profiler.stage(f"load {kind}", model=spec, **self._formats(kind)):
                    self.live[kind] = self.loaders[kind](spec)
            else:
                self.live[kind] = self.loaders[kind](spec)
            return use(self.live[kind])
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            self.free()

    def free(self) -> None:
        """Drop every loaded auxiliary model and give its memory back (CUDA cache included)."""
        if not self.live:
            return
        self.live.clear()
        gc.collect()
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- the stages


def run_stage1(aux: AuxModels, layout: Any, options: Stage1Options, append_instances: bool, profiler: Any,
               on_step: Callable[[int, int], None] | None = None,
               cancel: threading.Event | None = None) -> Any:
    """Layout -> Stage1Result (depth 'L' and RGB preview at options.size); cancel -> RenderCancelled."""
    from threedis.engine.stage1 import Stage1Cancelled

    width, height = options.size

    def generate(pipe: Any) -> Any:
        return pipe.generate(
            layout.prompt, [inst.prompt for inst in layout.instances], layout.boxes, width=width, height=height,
            steps=options.steps, guidance=options.guidance, migc_steps=options.migc_steps,
            phase_augment=options.phase_augment, seed=options.seed, on_step=on_step, cancel=cancel,
            append_instances=append_instances,
            **({} if options.negative_prompt is None else {"negative_prompt": options.negative_prompt}),
        )

    with profiler.stage("stage1", steps=options.steps, width=width, height=height):
        try:
            return aux.run("stage1", generate, profiler)
        except Stage1Cancelled as err:
            raise RenderCancelled(str(err)) from None


def mask_images(masks: list[torch.Tensor | None]) -> list[Image.Image | None]:
    """Masks from enhance_regions (bool or float 0..1, [H, W]) -> 8-bit 'L' images, 255 = inside."""
    out: list[Image.Image | None] = []
    for mask in masks:
        if mask is None:
            out.append(None)
            continue
        values = (mask.detach().to(torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)  # [H, W]
        out.append(Image.fromarray(values.cpu().numpy()))
    return out


def run_sam(aux: AuxModels, layout: Any, depth_image: Image.Image, user_masks: list[Any | None],
            profiler: Any) -> list[Image.Image | None]:
    """SAM2 masks for the instances without a user mask (None: SAM found nothing, keep the box).

    Runs on the depth image already at the output size (SPEC 7). Returns one entry per
    instance; entries of instances with a user mask are None here (the caller keeps theirs).
    """
    from threedis.engine.sam_masks import enhance_regions

    todo = [i for i, m in enumerate(user_masks) if m is None]
    with profiler.stage("sam", instances=len(todo)):
        found = aux.run("sam", lambda masker: enhance_regions(layout, depth_image, masker, user_masks), profiler)
    return mask_images([found[i] if user_masks[i] is None else None for i in range(len(user_masks))])
