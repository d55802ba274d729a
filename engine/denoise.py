"""The engine's own FLUX depth rendering loop (SPEC sections 3, 4 and 8).

Follows diffusers' FluxControlPipeline step for step (same random draws in the
same order, same scheduler, same packing), so with no instances, or with the
hard-control window at 0, a seed gives diffusers' image. What it adds: the
per-step text length (full text inside the hard-control window, the global
chunk after it), the attention rule passed to our processors, an optional
token permutation that groups image tokens by instance, progress, cancellation
and profiler stages.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from PIL import Image

from threedis.engine.encoding import T5_MAX_LENGTH, EncodedPrompts
from threedis.engine.errors import NonFiniteError, UserError
from threedis.engine.notices import warn
from threedis.kernels import rule
from threedis.kernels.rule import Phases, Schedule, TokenLayout

__all__ = [
    "DenoiseSettings",
    "RenderCancelled",
    "StepCallback",
    "control_latents",
    "decode",
    "denoise",
    "image_processor_for",
    "initial_latents",
    "latent_image_ids",
    "latent_preview",
    "pack_latents",
    "render_image",
    "unpack_latents",
    "vae_scale_factor",
]

StepCallback = Callable[[int, int, "Image.Image | None"], None]
# use(key) -> context manager yielding the model "transformer" or "vae", placed for its stage
ModelAccess = Callable[[str], ContextManager[Any]]


class RenderCancelled(UserError):
    """The caller set the cancel event; raised at a step boundary after dropping the latents."""


@dataclass(frozen=True)
class DenoiseSettings:
    steps: int
    guidance: float
    schedule: Schedule
    backend: str = "sdpa"  # a resolved backend name (select_backend), passed to every attention call
    permute_tokens: bool = False
    preview: bool = False  # build a rough latent preview for on_step (costs a little per step)


# ------------------------------------------------------------------ latents <-> tokens


def vae_scale_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def image_processor_for(vae: Any) -> Any:
    """The same image processor FluxControlPipeline builds (resizes to multiples of 2 * VAE factor)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae) * 2, vae_latent_channels=vae.config.latent_channels)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latent image -> [B, (h/2)*(w/2), C*4] tokens, each a 2x2 patch, raster order."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, h/2, w/2, C, 2, 2]
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Inverse of pack_latents: [B, grid_h*grid_w, C*4] -> [B, C, 2*grid_h, 2*grid_w]."""
    b, _, c4 = tokens.shape
    patches = tokens.reshape(b, grid_h, grid_w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [B, C, gh, 2, gw, 2]
    return patches.reshape(b, c4 // 4, grid_h * 2, grid_w * 2)


def latent_image_ids(grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RoPE position ids of the image tokens: [grid_h*grid_w, 3] = (0, row, col) in raster order."""
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()
    return ids.to(device=device, dtype=dtype)


# ------------------------------------------------------------------ the pieces of a render


@torch.no_grad()
def control_latents(
    vae: Any, processor: Any, depth: Image.Image, width: int, height: int, generator: torch.Generator
) -> torch.Tensor:
    """Depth image -> packed control tokens [1, S, C*4].

    Draws the VAE posterior sample from `generator` first, as diffusers does, so the
    initial noise drawn next is the same as diffusers' for the same seed.
    """
    pixels = processor.preprocess(depth.convert("RGB"), height=height, width=width)  # [1, 3, H, W] in [-1, 1]
    # preprocess returns a channels-last view; diffusers' prepare_image makes it contiguous (repeat_interleave),
    # and the VAE's convolutions round differently on the two memory layouts.
    pixels = pixels.contiguous().to(device=vae.device, dtype=vae.dtype)
    z = vae.encode(pixels).latent_dist.sample(generator=generator)  # [1, C, H/f, W/f]
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    return pack_latents(z)


def initial_latents(
    generator: torch.Generator, channels: int, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Packed initial noise [1, S, channels*4], drawn as diffusers' randn_tensor draws it (CPU generator)."""
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor((1, channels, grid_h * 2, grid_w * 2), generator=generator, device=device, dtype=dtype)
    return pack_latents(noise)


@torch.no_grad()
def decode(vae: Any, processor: Any, latents: torch.Tensor, grid: tuple[int, int]) -> Image.Image:
    """Packed raster-order latents [1, S, C*4] -> PIL image (unscale, unshift, VAE decode)."""
    z = unpack_latents(latents, *grid)
    z = z / vae.config.scaling_factor + vae.config.shift_factor
    pixels = vae.decode(z.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]  # [1, 3, H, W]
    if not bool(torch.isfinite(pixels).all()):  # postprocess would save them as a black image
        raise NonFiniteError("the VAE decoder produced NaN or infinite pixels from finite latents: the VAE's "
                             "weights hold NaN/Inf (re-download the checkpoint), or its dtype overflowed (try bf16 "
                             "or fp32 for the vae in the profile)")
    return processor.postprocess(pixels, output_type="pil")[0]


def latent_preview(x0: torch.Tensor, grid: tuple[int, int], order: torch.Tensor | None = None) -> Image.Image:
    """Rough picture of a packed latent estimate: first three latent channels, min-max stretched.

    Not a decode (the VAE costs more than a step); enough to see composition emerge.
    """
    if order is not None:
        x0 = x0[:, torch.argsort(order.to(x0.device))]
    z = unpack_latents(x0.float(), *grid)[0, :3]  # [3, h, w]
    lo = z.amin(dim=(1, 2), keepdim=True)
    hi = z.amax(dim=(1, 2), keepdim=True)
    rgb = ((z - lo) / (hi - lo).clamp(min=1e-6) * 255).round().to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).cpu().numpy())


def _timesteps(scheduler: Any, steps: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """sigmas linspace(1, 1/steps, steps), shifted by mu(seq_len): diffusers' FLUX schedule."""
    from diffusers.pipelines.flux.pipeline_flux_control import calculate_shift

    config = scheduler.config
    mu = calculate_shift(
        seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
    return scheduler.timesteps


def _attention_call(tokens: TokenLayout | None, phases: Phases | None, backend: str) -> Any:
    from threedis.engine.processor import AttentionCall

    return AttentionCall(tokens, phases, backend)


def _prepare_attention(tokens: TokenLayout, phases: Phases, device: torch.device, dtype: torch.dtype,
                       backend: str) -> None:
    """Build this phase set's attention tables before the transformer runs, so a torch.compile'd
    transformer only looks them up (no graph break). Best effort: the attention call reports real errors."""
    from threedis.kernels.attention import prepare_attention

    try:
        prepare_attention(tokens, phases, device, dtype, backend)
    except rule.RuleError:
        pass


def _attention_sparsity(tokens: TokenLayout, phases: Phases, device: torch.device, dtype: torch.dtype,
                        backend: str) -> dict[str, Any]:
    """Density and tile fraction of this phase set for the step stages of the report (best effort)."""
    from threedis.kernels.attention import attention_sparsity

    try:
        return attention_sparsity(tokens, phases, device, dtype, backend)
    except rule.RuleError:
        return {}


def _describe_sparsity(phases: Phases, sparsity: dict[str, Any]) -> str:
    switches = "".join(name for name, on in (("I2I ", phases.i2i), ("I2T ", phases.i2t), ("T2I ", phases.t2i),
                                             ("T2T ", phases.t2t)) if on).strip() or "none"
    tiles = f"{sparsity['tile_fraction']:.1%} of tiles computed"
    if "tile" in sparsity:
        tiles += f" ({sparsity['tile']})"
    return f"phases {switches}: {sparsity['density']:.1%} of pairs allowed, {tiles}"


def _first_non_finite_weight(model: Any) -> str | None:
    """Name of the first float parameter holding NaN/Inf (quantized or meta tensors are skipped)."""
    for name, param in model.named_parameters():
        try:
            if param.is_floating_point() and not param.is_meta and not bool(torch.isfinite(param).all()):
                return name
        except (RuntimeError, TypeError, NotImplementedError):  # packed or quantized storage: not checkable
            continue
    return None


def _non_finite_cause(step: int, total: int, settings: DenoiseSettings, control: torch.Tensor,
                      text: EncodedPrompts, transformer: Any) -> str:
    """Why the latents stopped being finite, checked from the cheapest suspect on (only after a failure)."""
    where = f"the latents stopped being finite (NaN/Inf) at step {step} of {total}"
    if not math.isfinite(settings.guidance):
        return f"{where}: guidance is {settings.guidance!r}; give a finite guidance such as 3.5 or 10"
    if not bool(torch.isfinite(control).all()):
        return (f"{where}: the depth map's control latents are not finite: check the depth map, or the VAE's "
                f"weights for NaN/Inf")
    if not (bool(torch.isfinite(text.embeds).all()) and bool(torch.isfinite(text.pooled).all())):
        return (f"{where}: the prompt embeddings are not finite: the text encoders' weights hold NaN/Inf "
                f"(re-download the checkpoint), or the prompt cache is corrupted (delete it)")
    name = _first_non_finite_weight(transformer)
    if name is not None:
        return f"{where}: the transformer's weights hold NaN/Inf ({name}); re-download or rebuild the checkpoint"
    return (f"{where}: the transformer overflowed in {transformer.dtype}; try a lower guidance than "
            f"{settings.guidance:g}, or bf16/fp32 weights for the transformer")


def denoise(
    transformer: Any,
    scheduler: Any,
    latents: torch.Tensor,
    control: torch.Tensor,
    image_ids: torch.Tensor,
    text: EncodedPrompts,
    tokens: TokenLayout,
    settings: DenoiseSettings,
    profiler: Any,
    on_step: StepCallback | None = None,
    cancel: threading.Event | None = None,
    step_cache: Any = None,
) -> torch.Tensor:
    """Flow-match Euler loop. latents/control: [1, S, 64] in token order; returns latents in that order.

    Inside the hard-control window (step < schedule.hard) the transformer sees all
    N+1 text chunks and the rule for that step's phases; afterwards only the global
    chunk, with plain attention. `scheduler` is a fresh copy: its step counter is
    per-render state. step_cache: a prepared StepCacheRunner (threedis.engine.step_cache)
    or None; each step runs in its cache context, keyed by text length and phases.
    """
    device = latents.device
    timesteps = _timesteps(scheduler, settings.steps, latents.shape[1], device)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([1], settings.guidance, device=device, dtype=torch.float32).expand(latents.shape[0])
    full_text, full_ids = text.embeds, text.text_ids
    global_text, global_ids = text.global_only()
    plain = _attention_call(None, None, settings.backend)
    masked = tokens.num_instances > 0
    current: tuple[Phases | None, Any] = (None, plain)
    sparsity: dict[str, Any] = {}
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        if cancel is not None and cancel.is_set():
            # drop every tensor of this render before the exception's traceback keeps this frame alive
            latents = control = image_ids = text = tokens = full_text = global_text = enc = current = None
            raise RenderCancelled(f"render cancelled before step {i + 1} of {total}")
        phases = settings.schedule.at(i) if masked else None
        if phases is None:
            enc, txt_ids, call = global_text, global_ids, plain
        else:
            if current[0] != phases:  # new object only on a phase change, so per-layout caches keep hitting
                current = (phases, _attention_call(tokens, phases, settings.backend))
                _prepare_attention(tokens, phases, device, latents.dtype, settings.backend)
                sparsity = _attention_sparsity(tokens, phases, device, latents.dtype, settings.backend)
                if sparsity:
                    profiler.note(f"attention from step {i}", _describe_sparsity(phases, sparsity))
            enc, txt_ids, call = full_text, full_ids, current[1]
        cost = sparsity if phases is not None else {}
        with profiler.stage("step", step=i, text_tokens=int(enc.shape[1]), masked=phases is not None, **cost):
            model_in = torch.cat([latents, control], dim=2)  # [1, S, 64 + 64]
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            cache_ctx = step_cache.step(i, (int(enc.shape[1]), phases)) if step_cache is not None \
                else contextlib.nullcontext()
            with cache_ctx:
                pred = transformer(
                    hidden_states=model_in,
                    timestep=timestep / 1000,
                    guidance=guidance,
                    pooled_projections=text.pooled,
                    encoder_hidden_states=enc,
                    txt_ids=txt_ids,
                    img_ids=image_ids,
                    joint_attention_kwargs={"threedis": call},
                    return_dict=False,
                )[0]  # [1, S, 64]
            preview = None
            if settings.preview and on_step is not None:
                sigma = scheduler.sigmas[scheduler.step_index if scheduler.step_index is not None else i]
                x0 = latents.float() - sigma.to(device) * pred.float()
                preview = latent_preview(x0, tokens.grid, tokens.order)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
            del model_in, pred
        # One host sync per step (cheap next to a transformer pass): a NaN render stops here, not as a black PNG.
        if not bool(torch.isfinite(latents).all()):
            message = _non_finite_cause(i + 1, total, settings, control, text, transformer)
            latents = control = image_ids = text = tokens = full_text = global_text = enc = current = None
            raise NonFiniteError(message)
        if on_step is not None:
            on_step(i + 1, total, preview)
    if cancel is not None and cancel.is_set():
        latents = control = image_ids = text = tokens = full_text = global_text = enc = None
        raise RenderCancelled(f"render cancelled after the last step ({total} of {total}), before decoding")
    return latents


# ------------------------------------------------------------------ one whole render


def regions_for(boxes: list, masks: list, grid: tuple[int, int]) -> torch.Tensor:
    """BoolTensor[N, h, w]: each instance's box cells, or its mask's cells where it has a mask."""
    h, w = grid
    out = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, (box, mask) in enumerate(zip(boxes, masks)):
        if mask is None:
            out[i] = rule.box_regions([box], h, w)[0]
        else:
            values = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)  # [H, W]
            out[i] = rule.mask_regions([values], h, w)[0]
            if not out[i].any():
                why = ("its mask is all black (no pixel inside)" if not values.any()
                       else f"its mask is too small or thin to cover a cell of the {h}x{w} token grid")
                warn(f"instances[{i}]: {why}, so the instance has no image region and its prompt shapes nothing; "
                     f"fix the mask or remove it to use the box")
    return out


def _warn_truncated(text: EncodedPrompts) -> None:
    """Prompts longer than the kept chunk lose their tail: say which, and by how much."""
    for i in text.truncated:
        who = "the global prompt (as encoded)" if i == 0 else f"instances[{i - 1}].prompt"
        count = text.token_counts[i]
        tokens = f"at least {count}" if count >= T5_MAX_LENGTH else str(count)
        warn(f"{who} has {tokens} T5 tokens but only the first {text.chunk} are used; shorten it or raise "
             f"chunk (--chunk, at most {T5_MAX_LENGTH})")


def render_image(
    transformer: Any,
    vae: Any,
    scheduler: Any,
    text: EncodedPrompts,
    depth: Image.Image,
    regions: torch.Tensor,
    width: int,
    height: int,
    seed: int,
    settings: DenoiseSettings,
    profiler: Any,
    on_step: StepCallback | None = None,
    cancel: threading.Event | None = None,
    device: torch.device | None = None,
    *,
    use: ModelAccess | None = None,
    step_cache: Any = None,
) -> Image.Image:
    """Depth + encoded text + instance regions -> image, in diffusers' order of random draws.

    regions: BoolTensor[N, h, w] on the token grid (h, w) = (height, width) / (2 * VAE factor).
    device: where latents live (default: the transformer's first parameter's device).
    use: how to get each model for its stage (a runtime's residency manager: a model may
    move to the GPU only for its stage, or be loaded at first use); when given,
    `transformer` and `vae` may be None. step_cache: see `denoise`.
    """
    if use is None:
        given = {"transformer": transformer, "vae": vae}
        use = lambda key: contextlib.nullcontext(given[key])  # noqa: E731
    generator = torch.Generator("cpu").manual_seed(int(seed))
    with use("vae") as vae:
        factor = 2 * vae_scale_factor(vae)
        if width % factor or height % factor:
            raise UserError(f"image size {width}x{height} must be a multiple of {factor} on both sides")
        grid = (height // factor, width // factor)
        if tuple(regions.shape[1:]) != grid:
            raise UserError(f"instance regions are on a {tuple(regions.shape[1:])} grid, expected {grid}")
        if text.num_chunks != regions.shape[0] + 1:
            raise UserError(f"{text.num_chunks} text chunks for {regions.shape[0]} instances; expected N + 1")
        _warn_truncated(text)
        processor = image_processor_for(vae)
        with profiler.stage("control latents"):
            control = control_latents(vae, processor, depth, width, height, generator)  # [1, S, 64]
        del vae

    with use("transformer") as transformer:
        device = torch.device(device) if device is not None else next(transformer.parameters()).device
        dtype = transformer.dtype
        control = control.to(device=device, dtype=dtype)
        channels = transformer.config.in_channels // 8
        latents = initial_latents(generator, channels, *grid, device, dtype)  # [1, S, 64]
        image_ids = latent_image_ids(*grid, device, dtype)  # [S, 3]

        order = rule.membership_order(regions) if settings.permute_tokens else None
        if order is not None:  # group image tokens by instance; every op but attention is per token
            index = order.to(device)
            latents, control, image_ids = latents[:, index], control[:, index], image_ids[index]
        tokens = rule.TokenLayout.build(regions, chunk=text.chunk, order=order).to(device)
        text = EncodedPrompts(
            text.embeds.to(device=device, dtype=dtype), text.pooled.to(device=device, dtype=dtype),
            text.text_ids.to(device=device, dtype=dtype), text.chunk, text.prompts, text.token_counts,
        )
        if step_cache is not None:
            step_cache.prepare(transformer, settings.steps)
        try:
            latents = denoise(transformer, scheduler, latents, control, image_ids, text, tokens, settings, profiler,
                              on_step, cancel, step_cache=step_cache)
        except (RenderCancelled, NonFiniteError):
            latents = control = image_ids = text = tokens = None  # the traceback keeps this frame: empty it
            del transformer
            if device.type == "cuda":
                torch.cuda.empty_cache()
            raise
        del control, transformer
    if order is not None:
        latents = latents[:, torch.argsort(order).to(device)]
    with use("vae") as vae:
        with profiler.stage("decode"):
            image = decode(vae, processor, latents, grid)
        del vae  # a model freed after its stage must not outlive it here
    return image
