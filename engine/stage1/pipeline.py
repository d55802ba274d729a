"""Stage 1 of 3DIS: layout -> depth with LDM3D-4c, the fine-tuned UNet and the layout adapter.

Same loop as diffusers' StableDiffusionLDM3DPipeline (UniPC, classifier-free
guidance, VAE decode to RGB + depth), so with no instances a seed gives diffusers'
picture; what it adds is the per-instance text, the box masks and the adapter
switch per step, passed to our attention processors (see processors.py).
"""

from __future__ import annotations

import math
import numbers
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from threedis.engine.errors import UserError
from threedis.engine.loading import checked_from_pretrained, loading_component, read_component_config
from threedis.engine.layout import global_prompt_for
from threedis.engine.stage1.adapter import MAX_ADAPTER_INSTANCES
from threedis.engine.stage1.checkpoint import (
    ADAPTER_FILENAME,
    UNET_FILENAME,
    WEIGHTS_REPO_ID,
    load_adapter_weights,
    load_state_file,
    load_unet_weights,
    resolve_weight_file,
)
from threedis.engine.stage1.masks import BoxMasks, to_xxyy
from threedis.engine.stage1.processors import RenderState, Stage1Call, install_processors, make_adapters
from threedis.engine.model_paths import DEFAULT_BASE_ID, stage1_folder
from threedis.engine.tiny_rules import tiny_hint

__all__ = [
    "DEFAULT_BASE_ID",
    "DEFAULT_GUIDANCE",
    "DEFAULT_MIGC_STEPS",
    "DEFAULT_NEGATIVE",
    "DEFAULT_STEPS",
    "Stage1Cancelled",
    "Stage1Pipeline",
    "Stage1Result",
    "augment_phrase",
]

DEFAULT_NEGATIVE = "worst quality, low quality, bad anatomy, watermark, text, blurry, extra hands"
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 6.5
# The demos pass MIGCsteps=15 and test `step > 15` to turn the adapter off, so it runs
# at steps 0..15: 16 of 30. Here the adapter is on while `step < migc_steps`.
DEFAULT_MIGC_STEPS = 16
# The refined shader is counted the same way: the authors' NaiveFuserSteps=K keeps it on
# at steps 0..K (their test is `step > K` for plain cross-attention), i.e. refine_steps = K + 1.
# The demos pass K=30 for 30 steps: on at every step, which refine_steps=None means here.
_PARTS = {
    "unet": ["config.json"],
    "vae": ["config.json"],
    "text_encoder": ["config.json"],
    "tokenizer": ["vocab.json", "merges.txt"],
    "scheduler": ["scheduler_config.json"],
}

# Part -> (config file, bundled real config it is checked against); names in messages say "stage 1 <part>".
_CONFIGS = {
    "unet": ("config.json", "ldm3d_4c_unet"),
    "vae": ("config.json", "ldm3d_4c_vae"),
    "text_encoder": ("config.json", "ldm3d_4c_text"),
    "scheduler": ("scheduler_config.json", "ldm3d_4c_scheduler"),
}

StepCallback = Callable[[int, int], None]


class Stage1Cancelled(UserError):
    """The caller set the cancel event; raised at a step boundary."""


@dataclass
class Stage1Result:
    depth: Image.Image  # 8-bit grey, near = bright, at the generation size
    rgb: Image.Image  # the model's RGB channels: a free preview
    depth_array: np.ndarray = field(repr=False)  # float32 [H, W] in [0, 1], before quantisation
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


def augment_phrase(phrase: str, num_instances: int) -> str:
    """The authors' "phase augmentation": the phrase repeated min(N, 7) times, joined by ", and "."""
    return ", and ".join([phrase] * min(num_instances, 7))


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_base(path_or_id: str | os.PathLike[str], local_files_only: bool, unet_weights: bool) -> Path:
    folder = stage1_folder(path_or_id)  # a local folder, a UserError, or None for a hub id
    if folder is not None:
        return folder
    text = os.fspath(path_or_id)
    from huggingface_hub import snapshot_download

    parts = [p for p in _PARTS if p != "unet"]
    patterns = ["model_index.json", "unet/config.json", *(f"{p}/*" for p in parts)]
    if unet_weights:
        patterns.append("unet/*")
    try:
        return Path(snapshot_download(text, allow_patterns=patterns,
                                      ignore_patterns=["*.bin", "*.ckpt", "*.pt", "*.msgpack", "*.h5", "*.onnx"],
                                      local_files_only=local_files_only))
    except Exception as exc:  # offline, unknown id: the same advice
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"cannot get the stage-1 base model {text!r}: {type(exc).__name__}: {first[:200]}; "
                        f"without internet, run `hf download {DEFAULT_BASE_ID} --local-dir DIR` "
                        f"on a connected machine and pass DIR; {tiny_hint('ldm3d')}") from None


def _check_base(base: Path) -> dict[str, dict[str, Any]]:
    """Every part present and every config sane (one UserError naming part and file); returns the configs."""
    missing = [f"{part}/{f}" for part, files in _PARTS.items() for f in files if not (base / part / f).is_file()]
    if missing:
        raise UserError(f"stage-1 base model {base} is incomplete, missing: {', '.join(missing)}")
    configs = {part: read_component_config(f"stage 1 {part}", base / part / name, ref)
               for part, (name, ref) in _CONFIGS.items()}
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    fits = (("cross_attention_dim", 768, "text_encoder's hidden_size", text.get("hidden_size", 768)),
            ("in_channels", 4, "vae's latent_channels", vae.get("latent_channels", 4)))
    for key, default, what, expected in fits:
        if unet.get(key, default) != expected:
            raise UserError(f"stage 1 unet: {base / 'unet' / 'config.json'}: {key} is {unet.get(key, default)} but "
                            f"must be {what} ({expected}); are parts of two models mixed in one folder?")
    return configs


def _weights(spec: str | os.PathLike[str] | None, base: Path, filename: str, local_files_only: bool) -> Path | None:
    """"auto": `filename` (or its .safetensors) inside the base folder, else the authors' hub repo."""
    if spec is None:
        return None
    if spec == "auto":
        for candidate in (base / filename, (base / filename).with_suffix(".safetensors")):
            if candidate.is_file():
                return candidate
        spec = WEIGHTS_REPO_ID
    return resolve_weight_file(spec, filename, local_files_only)


def refine_steps_for(refine: bool, refine_steps: int | None, steps: int) -> int:
    """The number of leading steps with the refined shader on, from the old switch and the step count.

    refine_steps None: every step if `refine` (the demos), none if not; a count beyond
    `steps` is every step. refine=False with a count above 0 contradicts itself.
    """
    if not isinstance(refine, bool):
        raise UserError(f"refine must be true or false, got {refine!r}")
    if refine_steps is None:
        return steps if refine else 0
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, numbers.Integral) or refine_steps < 0:
        raise UserError(f"refine_steps must be a whole number >= 0 (0 = shader off) or None (every step), "
                        f"got {refine_steps!r}")
    if not refine and refine_steps > 0:
        raise UserError(f"refine=False turns the refined shader off, but refine_steps = {refine_steps}; "
                        f"give one of them")
    return min(int(refine_steps), steps)


def _check_layout(instance_prompts: Sequence[str], boxes: Sequence[Sequence[float]], width: int, height: int,
                  steps: int, migc_steps: int) -> None:
    if len(instance_prompts) != len(boxes):
        raise UserError(f"got {len(instance_prompts)} instance prompts but {len(boxes)} boxes; give one box each")
    for i, box in enumerate(boxes):
        if len(box) != 4 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in box):
            raise UserError(f"box {i} must be 4 numbers (x0, y0, x1, y1), got {box!r}")
        x0, y0, x1, y1 = box
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise UserError(f"box {i} {tuple(box)} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    for name, v in (("width", width), ("height", height)):
        if v < 8 or v % 8:
            raise UserError(f"stage-1 {name} must be a positive multiple of 8, got {v}")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if migc_steps < 0:
        raise UserError(f"migc_steps must be >= 0, got {migc_steps}")


class Stage1Pipeline:
    """LDM3D-4c components with stage-1 processors installed on the UNet."""

    def __init__(self, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any,
                 scheduler_config: dict[str, Any], has_adapter: bool, device: torch.device, dtype: torch.dtype):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = scheduler_config
        self.has_adapter = has_adapter
        self.device, self.dtype = device, dtype
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(
        cls,
        base_path_or_id: str | os.PathLike[str] = DEFAULT_BASE_ID,
        unet_ckpt: str | os.PathLike[str] | None = "auto",
        adapter_ckpt: str | os.PathLike[str] | None = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = False,
        vae_dtype: torch.dtype | None = None,
        text_encoder_dtype: torch.dtype | None = None,
    ) -> Stage1Pipeline:
        """Load the base model and the authors' weights.

        unet_ckpt / adapter_ckpt: a file, a folder holding the release's file name, a hub
        repo id, "auto" (the file inside the base folder if there, else the authors' hub
        repo), or None (keep the base UNet / no adapter: refined shader only).
        dtype: the UNet's and adapter's (default fp16 on CUDA, fp32 on the CPU);
        vae_dtype / text_encoder_dtype default to it (profiles keep the VAE in fp32).
        """
        from accelerate import init_empty_weights
        from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        device = torch.device(device) if device is not None else _default_device()
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        vae_dtype, text_encoder_dtype = vae_dtype or dtype, text_encoder_dtype or dtype
        base = _resolve_base(base_path_or_id, local_files_only, unet_weights=unet_ckpt is None)
        configs = _check_base(base)
        unet_file = _weights(unet_ckpt, base, UNET_FILENAME, local_files_only)
        adapter_file = _weights(adapter_ckpt, base, ADAPTER_FILENAME, local_files_only)

        if unet_file is None:
            unet = checked_from_pretrained("stage 1 unet", base / "unet", UNet2DConditionModel, base,
                                           subfolder="unet", torch_dtype=dtype, use_safetensors=True,
                                           local_files_only=True)
        else:
            with loading_component("stage 1 unet", base / "unet"), init_empty_weights():
                unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
            with loading_component("stage 1 unet weights", unet_file):
                load_unet_weights(unet, load_state_file(unet_file), str(unet_file), dtype)
        adapters = make_adapters(unet) if adapter_file is not None else None
        procs = install_processors(unet, adapters)
        if adapter_file is not None:
            with loading_component("stage 1 layout adapter", adapter_file):
                load_adapter_weights(procs, load_state_file(adapter_file), str(adapter_file))
        for proc in procs.values():
            proc.to(dtype)
        # dtype is already right: diffusers' ModelMixin.to(dtype=...) would only add a warning
        unet.to(device).eval().requires_grad_(False)

        decoded = configs["vae"].get("out_channels", 3)
        if decoded != 4:
            raise UserError(f"stage 1 vae: {base / 'vae' / 'config.json'}: decodes {decoded} channels; stage 1 needs "
                            f"LDM3D-4c's 4 (RGB + depth)")
        vae = checked_from_pretrained("stage 1 vae", base / "vae", AutoencoderKL, base, subfolder="vae",
                                      torch_dtype=vae_dtype, use_safetensors=True,
                                      local_files_only=True).to(device).eval()
        text_encoder = checked_from_pretrained("stage 1 text_encoder", base / "text_encoder", CLIPTextModel, base,
                                               subfolder="text_encoder", dtype=text_encoder_dtype,
                                               use_safetensors=True, local_files_only=True).to(device).eval()
        with loading_component("stage 1 tokenizer", base / "tokenizer"):
            tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", local_files_only=True)
        with loading_component("stage 1 scheduler", base / "scheduler"):
            config = dict(UniPCMultistepScheduler.load_config(base / "scheduler"))
        return cls(unet, vae, text_encoder, tokenizer, config, adapter_file is not None, device, dtype)

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP last hidden states [K, 77, D] and pooled outputs [K, D] (final-norm EOS, unprojected)."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        out = self.text_encoder(ids)
        return out.last_hidden_state.to(self.dtype), out.pooler_output.to(self.dtype)

    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        instance_prompts: Sequence[str],
        boxes: Sequence[Sequence[float]],
        width: int = 512,
        height: int = 512,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        migc_steps: int = DEFAULT_MIGC_STEPS,
        phase_augment: bool = True,
        negative_prompt: str = DEFAULT_NEGATIVE,
        seed: int = 0,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        refine: bool = True,
        append_instances: bool = True,
        refine_steps: int | None = None,
    ) -> Stage1Result:
        """Layout -> depth. boxes are (x0, y0, x1, y1) in 0..1.

        append_instances: the global prompt gets ",<instance>" for each instance, as in the
        authors' demos. refine_steps: the refined shader is on for steps 0..refine_steps-1
        where the adapter is not running (the authors' NaiveFuserSteps + 1); None = every
        step, 0 = off (as refine=False). refine_steps=0 with migc_steps=0 gives plain
        text-to-depth. on_step(done, total) runs after every step; `cancel` is checked
        before each step.
        """
        from diffusers import UniPCMultistepScheduler
        from diffusers.utils.torch_utils import randn_tensor

        _check_layout(instance_prompts, boxes, width, height, steps, migc_steps)
        refine_steps = refine_steps_for(refine, refine_steps, steps)
        n = len(instance_prompts)
        if n > MAX_ADAPTER_INSTANCES and self.has_adapter and migc_steps > 0:
            raise UserError(f"the layout adapter handles at most {MAX_ADAPTER_INSTANCES} instances, got {n}; "
                            f"remove instances or pass migc_steps=0")
        global_prompt = global_prompt_for(prompt, instance_prompts, append_instances)
        texts = [augment_phrase(p, n) if phase_augment else p for p in instance_prompts]
        hidden, pooled = self.encode([global_prompt, *texts])  # [N + 1, 77, D], [N + 1, D]
        cfg = guidance > 1.0
        context = torch.cat([self.encode([negative_prompt])[0], hidden[:1]]) if cfg else hidden[:1]

        render = None
        if n:
            masks = BoxMasks(boxes, height, width, self.device, self.dtype, self.vae_scale_factor)
            render = RenderState(hidden[1:], pooled[1:], to_xxyy(boxes).to(self.device), masks,
                                 torch.Generator().manual_seed(seed))
        scheduler = UniPCMultistepScheduler.from_config(self.scheduler_config)  # fresh: schedulers keep state
        scheduler.set_timesteps(steps, device=self.device)
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=torch.Generator().manual_seed(seed), device=self.device,
                               dtype=context.dtype) * scheduler.init_noise_sigma
        total = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            if cancel is not None and cancel.is_set():
                raise Stage1Cancelled(f"stage 1 cancelled before step {i + 1} of {total}")
            call = Stage1Call(render, adapter_on=self.has_adapter and i < migc_steps, refine_on=i < refine_steps)
            model_in = scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
            noise = self.unet(model_in, t, encoder_hidden_states=context,
                              cross_attention_kwargs={"stage1": call}).sample
            if cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance * (cond - uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
            if on_step is not None:
                on_step(i + 1, total)
        if cancel is not None and cancel.is_set():
            raise Stage1Cancelled("stage 1 cancelled before decoding")

        image = self._decode(latents)  # [4, H, W] in [0, 1], float32
        settings = {"prompt": global_prompt, "instance_prompts": list(texts), "boxes": [list(b) for b in boxes],
                    "width": width, "height": height, "steps": steps, "guidance": guidance,
                    "migc_steps": migc_steps if self.has_adapter else 0, "refine_steps": refine_steps,
                    "negative_prompt": negative_prompt}
        rgb = (image[:3].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        depth = image[3].numpy()
        return Stage1Result(depth=Image.fromarray((depth * 255).round().astype(np.uint8)),
                            rgb=Image.fromarray(rgb), depth_array=depth, seed=seed, settings=settings)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode -> clamp(x / 2 + 0.5) as float32 on the CPU; redone in fp32 if fp16 overflows."""
        z = latents / self.vae.config.scaling_factor
        out = self.vae.decode(z.to(self.vae.dtype)).sample
        if not torch.isfinite(out).all() and self.vae.dtype != torch.float32:
            import copy

            vae32 = torch.nn.Module.to(copy.deepcopy(self.vae), torch.float32)  # the shared VAE stays as is
            out = vae32.decode(z.float()).sample
            del vae32
        return (out[0].float() / 2 + 0.5).clamp(0, 1).cpu()
