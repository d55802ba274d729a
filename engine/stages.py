"""The stages around the FLUX render: layout -> depth (stage 1), SAM2 masks, depth from a photo.

Why a module of its own: each auxiliary model is needed for a moment of a render.
`AuxModels` remembers *where* each one is (a folder or hub id) and how to load it;
the engine's `ModelManager` (threedis.engine.runtime) holds it in a slot and places
it per profile like any other model. The built-in profiles free each one as soon as
its stage ends (gpu-then-freed / cpu-then-freed), so stage 1 (~1B parameters) and
SAM2 are gone before FLUX's transformer needs the memory; then between stages
`AuxModels.live` is empty and nothing else on the engine references them. A profile
that says `gpu` or `cpu` (or offload = "model") keeps one loaded across renders.

Order inside a render: stage 1 -> SAM -> stage 2 (encode, steps, decode).
"""

from __future__ import annotations

import os
import threading
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, TypeVar

import torch
from PIL import Image

from threedis.engine.denoise import RenderCancelled
from threedis.engine.errors import UserError
from threedis.engine.profiles import Profile
from threedis.engine.sizes import parse_size
from threedis.engine.tiny_rules import MIGC_STEPS, STAGE1_SIZE, STAGE1_STEPS, is_tiny

__all__ = [
    "AUX_KINDS",
    "PROFILE_KEYS",
    "AuxModels",
    "Stage1Options",
    "TINY_STAGE1",
    "default_stage1",
    "mask_images",
    "raise_if_cancelled",
    "run_sam",
    "run_stage1",
]

AUX_KINDS = ("stage1", "sam", "depth")
# Each kind's slot in the engine's ModelManager (runtime.SLOTS names the profile entries).
_SLOT = {"stage1": "stage1", "sam": "sam2", "depth": "depth_estimator"}
# The profile entries (profiles/*.toml) that govern each auxiliary model.
PROFILE_KEYS: dict[str, tuple[str, ...]] = {
    "stage1": ("ldm3d_unet", "ldm3d_vae", "ldm3d_text"), "sam": ("sam2",), "depth": ("depth_estimator",)}

T = TypeVar("T")


def raise_if_cancelled(cancel: threading.Event | None, where: str) -> None:
    """Stop between stages with the same error the denoising loop raises."""
    if cancel is not None and cancel.is_set():
        raise RenderCancelled(f"render cancelled {where}")


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
    # Steps 0..refine_steps-1 use the refined shader where the adapter is not running (the
    # authors' NaiveFuserSteps + 1); None: every step (the demos), 0: off (plain cross-attention).
    refine_steps: int | None = None

    def __post_init__(self) -> None:
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise UserError(f"stage1_negative_prompt must be text, got {self.negative_prompt!r}")
        from threedis.engine.checks import check_guidance, check_seed, check_steps  # the render's own checks

        check_steps(self.steps, "stage1_steps")
        check_steps(self.migc_steps, "migc_steps", low=0)
        if self.refine_steps is not None:
            check_steps(self.refine_steps, "refine_steps", low=0)
        if self.seed is not None:
            check_seed(self.seed, "stage1_seed")
        object.__setattr__(self, "size", parse_size(self.size))
        object.__setattr__(self, "guidance", check_guidance(self.guidance, "stage1_guidance"))
        if not isinstance(self.phase_augment, bool):
            raise UserError(f"phase_augment must be true or false, got {self.phase_augment!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["size"] = list(self.size)
        return out


# What a tiny random-weight stage-1 checkpoint runs at unless told otherwise (tiny_rules: seconds on a CPU).
TINY_STAGE1 = Stage1Options(steps=STAGE1_STEPS, migc_steps=MIGC_STEPS, size=STAGE1_SIZE)


def default_stage1(model: str | os.PathLike[str] | None) -> Stage1Options:
    """Stage 1's settings where the caller gives none: the authors' demos', or TINY_STAGE1 for a tiny checkpoint.

    One rule for Engine.render, the CLI, batch jobs and the service; a caller's own values replace these.
    """
    return TINY_STAGE1 if is_tiny(model) else Stage1Options()


class AuxModels:
    """Where stage 1, SAM2 and the depth estimator are, and how each loads; the manager places them.

    specs: "stage1" None (no stage 1: renders need a depth map), "auto" (the authors'
    release: LDM3D-4c base + their UNet and adapter) or a base folder / hub id holding
    the release's two files; "sam" and "depth" a folder or hub id, None for the default id.
    models: the engine's ModelManager, whose profile (ldm3d_unet / ldm3d_vae / ldm3d_text /
    sam2 / depth_estimator entries) sets each model's float format, device, offload and
    lifetime. None: a manager of its own for `profile` on `device` (profile None: "auto",
    i.e. the cpu profile on a CPU device).
    `loaders` maps kind -> callable(spec) returning the loaded model, placed at
    `models.load_device(slot)`; an instance attribute, so a caller can wrap or replace one
    (test stubs).
    """

    def __init__(self, stage1: Any = None, sam: Any = None, depth: Any = None,
                 device: torch.device | str = "cpu", local_files_only: bool = False,
                 profile: Profile | None = None, models: Any = None) -> None:
        from threedis.engine.profiles import resolve_profile
        from threedis.engine.runtime import ModelManager

        self.specs: dict[str, Any] = {"stage1": stage1, "sam": sam, "depth": depth}
        self.local_files_only = bool(local_files_only)
        if models is None:
            profile = profile if profile is not None else resolve_profile("auto", device)
            models = ModelManager(profile, device, None)
        self.models = models
        self.device = models.device
        self.profile = models.profile
        self.loaders: dict[str, Callable[[Any], Any]] = {
            "stage1": self._load_stage1, "sam": self._load_sam, "depth": self._load_depth}

    @property
    def live(self) -> dict[str, Any]:
        """kind -> model, for the auxiliary models in memory now (empty between stages when freed)."""
        loaded = {kind: self.models.loaded(slot) for kind, slot in _SLOT.items()}
        return {kind: model for kind, model in loaded.items() if model is not None}

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

    def placement(self, key: str) -> tuple[torch.device, torch.dtype]:
        """(device a loader puts it on, dtype) of the profile entry `key` (e.g. "sam2")."""
        slot = next(_SLOT[kind] for kind, keys in PROFILE_KEYS.items() if key in keys)
        return self.models.load_device(slot), self.models.weights_dtype(key)

    def _formats(self, kind: str) -> dict[str, str]:
        """For the report: "<profile key>": "<weights>@<run device>" of each part of `kind`."""
        run = self.models.run_device(_SLOT[kind])  # stage 1: one device for its three parts
        return {key: f"{self.profile.policy(key).weights.value}@{run.type}" for key in PROFILE_KEYS[kind]}

    # -- default loaders ---------------------------------------------------------

    def _load_stage1(self, spec: str) -> Any:
        from threedis.engine.stage1 import Stage1Pipeline

        # One device for the whole pipeline (ldm3d_unet's); per-part float formats.
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
        """Return use(model) with `kind` loaded and placed; afterwards it is freed, parked or kept, per profile.

        On an error the traceback's finished frames are cleared, so the exception a
        caller keeps (pytest.raises, a UI's error log) does not keep the model alive.
        """
        if kind not in self.loaders:
            raise ValueError(f"unknown auxiliary model {kind!r}; expected one of {AUX_KINDS}")
        self.free()  # the models freed after their stage: at most one alive at a time

        def load() -> Any:
            spec = self.spec(kind)
            if profiler is None:
                return self.loaders[kind](spec)
            with profiler.stage(f"load {kind}", model=spec, **self._formats(kind)):
                return self.loaders[kind](spec)

        try:
            with self.models.use(_SLOT[kind], load=load) as model:
                try:
                    return use(model)
                finally:
                    del model  # this frame stays in a kept traceback: it must not hold the model
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            self.free()

    def free(self) -> None:
        """Drop every loaded auxiliary model its profile frees after the stage, and give the memory back."""
        for slot in _SLOT.values():
            if self.models.loaded(slot) is not None and self.models.freed_after_stage(slot):
                self.models.free(slot)


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
            append_instances=append_instances, refine_steps=options.refine_steps,
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
