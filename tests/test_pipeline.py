"""The engine's rendering loop against diffusers' own FluxControlPipeline on the tiny checkpoint.

References are independent of the code under test: diffusers' pipeline with its
stock attention processor (plain, or given the rule's dense boolean mask through
`attention_mask`), and the final VAE decoder input is compared, not just pixels.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from threedis.engine.api import Engine, RenderCancelled
from threedis.engine.errors import UserError
from threedis.engine.layout import Instance, Layout
from threedis.kernels.rule import Schedule, TokenLayout, box_regions, dense_allowed
from threedis.engine.api import RenderOptions

CHUNK = 16  # small T5 chunks keep the tiny renders fast; the method is the same at 200
# Equality with diffusers' fp32 pipeline needs fp32 weights and no step cache; the default (auto ->
# cpu) profile would store the transformer and T5 in bf16 and reuse blocks between steps.
EXACT = dict(dtype=torch.float32, overrides={"step_cache": "none"})


@pytest.fixture(scope="module")
def engine(tiny_flux_dir, tmp_path_factory) -> Engine:
    return Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa",
                                  cache_dir=tmp_path_factory.mktemp("engine-cache"), **EXACT)


@pytest.fixture(scope="module")
def pipe(tiny_flux_dir):
    from diffusers import FluxControlPipeline

    return FluxControlPipeline.from_pretrained(tiny_flux_dir, dtype=torch.float32).to("cpu")


@contextlib.contextmanager
def decoder_inputs(vae) -> Iterator[list[torch.Tensor]]:
    """Record every latent handed to vae.decode (the last tensor before pixels)."""
    seen: list[torch.Tensor] = []
    original = vae.decode

    def spy(z, *args, **kwargs):
        seen.append(z.detach().clone())
        return original(z, *args, **kwargs)

    vae.decode = spy
    try:
        yield seen
    finally:
        del vae.decode  # drop the instance attribute: the class method shows through again


@contextlib.contextmanager
def transformer_calls(transformer) -> Iterator[list[dict]]:
    """Record text length and the AttentionCall of every transformer forward."""
    calls: list[dict] = []

    def hook(module, args, kwargs):
        call = (kwargs.get("joint_attention_kwargs") or {}).get("threedis")
        calls.append({"text_len": kwargs["encoder_hidden_states"].shape[1], "txt_ids": kwargs["txt_ids"].shape[0],
                      "call": call})

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def two_birds(width: int = 64, height: int = 64) -> Layout:
    return Layout("a sunny garden", width, height, (
        Instance("a red bird with a crest", (0.1, 0.2, 0.5, 0.8)),
        Instance("a blue bird on a branch", (0.4, 0.1, 0.9, 0.9)),  # overlaps the first
    ))


def diffusers_decoder_input(pipe, text_embeds, pooled, depth, size, steps, seed, mask=None) -> torch.Tensor:
    width, height = size
    with decoder_inputs(pipe.vae) as seen:
        pipe(prompt_embeds=text_embeds, pooled_prompt_embeds=pooled, control_image=depth, height=height,
             width=width, num_inference_steps=steps, guidance_scale=10.0,
             generator=torch.Generator("cpu").manual_seed(seed),
             joint_attention_kwargs=None if mask is None else {"attention_mask": mask},
             output_type="pil")
    return seen[-1]


def engine_decoder_input(engine, layout, depth, permute_tokens=False, **kwargs):
    with decoder_inputs(engine.components.vae) as seen:
        result = engine.render(layout, depth=depth, options=RenderOptions(chunk=CHUNK, permute_tokens=permute_tokens),
                               **kwargs)
    return seen[-1], result


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    diff = (actual - expected).abs().max().item()
    print(f"max abs diff {diff:.3e} (scale {expected.abs().max().item():.3f})")
    assert diff <= atol


# ------------------------------------------------------------------ equality with diffusers


@pytest.mark.parametrize("size", [(64, 64), (128, 64)])
def test_zero_instances_equals_diffusers(engine, pipe, depth_image_64, size):
    layout = Layout("a quiet street at night", *size)
    depth = depth_image_64.resize(size)
    ours, result = engine_decoder_input(engine, layout, depth, steps=3, seed=7)
    text = engine.prompts.encode(layout.prompts(True), CHUNK)
    assert text.embeds.shape[1] == CHUNK
    reference = diffusers_decoder_input(pipe, text.embeds, text.pooled, depth, size, steps=3, seed=7)
    assert_close(ours, reference)
    assert result.image.size == size


def test_instances_with_hard_zero_equal_diffusers_on_global_chunk(engine, pipe, depth_image_64):
    layout = two_birds()
    schedule = Schedule(steps=3, hard=0, i2i=3, i2t=3, t2i=3, t2t=3)
    ours, _ = engine_decoder_input(engine, layout, depth_image_64, steps=3, seed=11, schedule=schedule)
    text = engine.prompts.encode(layout.prompts(True), CHUNK)
    reference = diffusers_decoder_input(pipe, text.embeds[:, :CHUNK], text.pooled, depth_image_64, (64, 64), 3, 11)
    assert_close(ours, reference)


@pytest.mark.parametrize("i2i", [0, 2])
def test_masked_render_equals_diffusers_with_dense_mask(engine, pipe, depth_image_64, i2i):
    """Constant phases over all steps: diffusers' stock processor with the rule's dense mask is the reference."""
    layout = two_birds()
    schedule = Schedule(steps=2, hard=2, i2i=i2i, i2t=2, t2i=2, t2t=2)
    ours, _ = engine_decoder_input(engine, layout, depth_image_64, steps=2, seed=5, schedule=schedule)
    text = engine.prompts.encode(layout.prompts(True), CHUNK)
    tokens = TokenLayout.build(box_regions(layout.boxes, 4, 4), chunk=CHUNK)
    mask = dense_allowed(tokens, schedule.at(0))  # [L, L] bool, True = may attend
    reference = diffusers_decoder_input(pipe, text.embeds, text.pooled, depth_image_64, (64, 64), 2, 5, mask=mask)
    assert_close(ours, reference)
    plain = diffusers_decoder_input(pipe, text.embeds, text.pooled, depth_image_64, (64, 64), 2, 5)
    assert (ours - plain).abs().max() > 1e-3  # the mask really changed the render


# ------------------------------------------------------------------ the loop's own behaviour


def test_hard_window_cuts_text_at_step_hard(engine, depth_image_64):
    layout = two_birds()
    schedule = Schedule(steps=4, hard=2, i2i=1, i2t=4, t2i=4, t2t=4)
    with transformer_calls(engine.components.transformer) as calls:
        engine.render(layout, depth=depth_image_64, steps=4, seed=0, schedule=schedule, options=RenderOptions(chunk=CHUNK))
    full = CHUNK * 3
    assert [c["text_len"] for c in calls] == [full, full, CHUNK, CHUNK]
    assert [c["txt_ids"] for c in calls] == [full, full, CHUNK, CHUNK]
    assert [c["call"].phases for c in calls] == [schedule.at(0), schedule.at(1), None, None]
    assert all(c["call"].tokens is None for c in calls[2:])
    assert calls[0]["call"].tokens is calls[1]["call"].tokens  # one token layout per render
    assert calls[0]["call"].backend == "sdpa"


def test_phases_object_reused_while_unchanged(engine, depth_image_64):
    schedule = Schedule(steps=3, hard=3, i2i=1, i2t=3, t2i=3, t2t=3)
    with transformer_calls(engine.components.transformer) as calls:
        engine.render(two_birds(), depth=depth_image_64, steps=3, seed=0, schedule=schedule, options=RenderOptions(chunk=CHUNK))
    assert calls[1]["call"] is calls[2]["call"]  # same phases at steps 1 and 2: same object
    assert calls[0]["call"].phases != calls[1]["call"].phases


def test_permute_tokens_gives_same_image(engine, depth_image_64):
    layout = two_birds(128, 64)
    depth = depth_image_64.resize((128, 64))
    schedule = Schedule(steps=2, hard=2, i2i=1, i2t=2, t2i=2, t2t=2)
    plain, _ = engine_decoder_input(engine, layout, depth, steps=2, seed=3, schedule=schedule)
    with transformer_calls(engine.components.transformer) as calls:
        permuted, _ = engine_decoder_input(engine, layout, depth, steps=2, seed=3, schedule=schedule,
                                           permute_tokens=True)
    order = calls[0]["call"].tokens.order
    assert order is not None and not torch.equal(order, torch.arange(order.numel()))
    assert_close(permuted, plain, atol=1e-4)


def test_cancel_mid_run_then_engine_still_works(engine, depth_image_64):
    cancel = threading.Event()
    done: list[int] = []

    def on_step(step: int, total: int, preview) -> None:
        done.append(step)
        if step == 1:
            cancel.set()

    with pytest.raises(RenderCancelled, match="cancelled"):
        engine.render(two_birds(), depth=depth_image_64, steps=4, seed=0, options=RenderOptions(chunk=CHUNK), on_step=on_step, cancel=cancel)
    assert done == [1]
    assert isinstance(RenderCancelled("x"), UserError)
    result = engine.render(two_birds(), depth=depth_image_64, steps=2, seed=0, options=RenderOptions(chunk=CHUNK))
    assert result.image.size == (64, 64)


def test_progress_reports_every_step_with_preview(engine, depth_image_64):
    seen: list[tuple] = []
    engine.render(two_birds(), depth=depth_image_64, steps=3, seed=0, options=RenderOptions(chunk=CHUNK, preview=True),
                  on_step=lambda step, total, preview: seen.append((step, total, preview)))
    assert [(s, t) for s, t, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert all(isinstance(p, Image.Image) and p.size == (8, 8) for _, _, p in seen)


def test_profiler_stages(engine, depth_image_64):
    result = engine.render(two_birds(), depth=depth_image_64, steps=2, seed=0, options=RenderOptions(chunk=CHUNK))
    # models load lazily at first use: "load <model>" stages appear in whichever render comes first
    names = [stage.name for stage in result.report.stages if not stage.name.startswith("load ")]
    assert names == ["encode", "control latents", "step", "step", "decode"]
    assert result.report.info["attention backend"] == "sdpa"


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_step_stages_report_density_and_tile_fraction(tiny_flux_dir, depth_image_64, tmp_path, backend):
    """Masked steps carry the exact share of allowed pairs (dense reference) and the tiles the backend computes."""
    from threedis.kernels.block_table import build_block_table

    eng = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend=backend, cache_dir=tmp_path, **EXACT)
    layout = two_birds(128, 128)
    schedule = Schedule(steps=3, hard=2, i2i=1, i2t=2, t2i=2, t2t=2)
    result = eng.render(layout, depth=depth_image_64, steps=3, seed=0, schedule=schedule, options=RenderOptions(chunk=CHUNK))
    steps = result.report.find("step")
    tokens = TokenLayout.build(box_regions(layout.boxes, 8, 8), chunk=CHUNK)
    for s in steps[:2]:
        phases = schedule.at(s.info["step"])
        assert s.info["density"] == pytest.approx(dense_allowed(tokens, phases).double().mean().item(), abs=1e-6)
        if backend == "sdpa":
            assert s.info["tile_fraction"] == 1.0
        else:
            assert 0 < s.info["tile_fraction"] <= 1
            assert s.info["tile"] == "128x128"
            visited = build_block_table(tokens, phases, 128, 128).tile_fraction
            assert s.info["tile_fraction"] == pytest.approx(visited)
    assert "density" not in steps[2].info  # past the hard window: plain attention
    notes = [k for k in result.report.info if k.startswith("attention from step")]
    assert notes == ["attention from step 0", "attention from step 1"]
    assert "of pairs allowed" in result.report.info["attention from step 0"]


# ------------------------------------------------------------------ depth input


def test_depth_of_other_mode_and_size_is_resized(engine, depth_image_64):
    layout = two_birds(128, 64)
    grey = depth_image_64.convert("L").resize((50, 37))
    as_rgb, result = engine_decoder_input(engine, layout, grey.convert("RGB"), steps=2, seed=1)
    assert result.depth.size == (128, 64) and result.depth.mode == "RGB"
    variants = [
        grey,  # mode L, other size
        np.asarray(grey),  # uint8 [H, W]
        np.asarray(grey).astype(np.float32) / 255.0,  # float in 0..1
        torch.from_numpy(np.asarray(grey).copy())[None].float() / 255.0,  # [1, H, W] tensor
        Image.fromarray(np.asarray(grey).astype(np.uint16) * 257),  # 16-bit grey
    ]
    for depth in variants:
        latents, result = engine_decoder_input(engine, layout, depth, steps=2, seed=1)
        assert result.depth.size == (128, 64)
        assert_close(latents, as_rgb, atol=1e-4)


def test_depth_missing_or_bad(engine, tmp_path):
    with pytest.raises(UserError, match="no depth map given"):
        engine.render(two_birds(), steps=1)
    with pytest.raises(UserError, match="not found"):
        engine.render(two_birds(), depth=tmp_path / "nope.png", steps=1)
    with pytest.raises(UserError, match="depth array"):
        engine.render(two_birds(), depth=np.zeros((4, 4, 7)), steps=1)


def test_bad_steps_and_schedule(engine, depth_image_64):
    with pytest.raises(UserError, match="schedule.steps"):
        engine.render(two_birds(), depth=depth_image_64, steps=3, schedule=Schedule(steps=4, hard=4))
    with pytest.raises(UserError, match="steps"):
        engine.render(two_birds(), depth=depth_image_64, steps=0)


def test_mask_instances_use_mask_regions(engine, depth_image_64, tmp_path):
    """A mask aligned to token cells covers exactly those cells; the other instance keeps its box."""
    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[16:48, 0:32] = 255  # token rows 1-2, columns 0-1 of the 4x4 grid
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    layout = Layout("a garden", 64, 64, (
        Instance("a red bird", (0.0, 0.0, 1.0, 1.0), mask=str(tmp_path / "mask.png")),
        Instance("a blue jay", (0.75, 0.75, 1.0, 1.0)),
    ))
    with transformer_calls(engine.components.transformer) as calls:
        engine.render(layout, depth=depth_image_64, steps=1, options=RenderOptions(chunk=CHUNK))
    tokens = calls[0]["call"].tokens
    image_member = tokens.member[tokens.text_len:].reshape(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[1:3, 0:2] |= 1
    expected[3, 3] |= 2
    assert torch.equal(image_member, expected)


# ------------------------------------------------------------------ CUDA (skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_backends_track_the_fp32_reference(tiny_flux_dir, depth_image_64, tmp_path):
    """bf16 renders with each usable backend (permuted or not) stay as close to an fp32 SDPA render
    as the bf16 SDPA render is, within a factor (the flash-attention tests' tolerance rule)."""
    from threedis.kernels.attention import BACKENDS, select_backend

    layout = two_birds(128, 64)
    depth = depth_image_64.resize((128, 64))
    schedule = Schedule(steps=3, hard=2, i2i=1, i2t=3, t2i=3, t2t=3)
    kwargs = dict(steps=3, seed=9, schedule=schedule)

    def decoder_input_of(dtype, backend, permute=False):
        engine = Engine.from_pretrained(tiny_flux_dir, device="cuda", dtype=dtype, backend=backend,
                                        cache_dir=tmp_path / str(dtype))
        latents, result = engine_decoder_input(engine, layout, depth, permute_tokens=permute, **kwargs)
        assert result.settings["dtype"] == str(dtype).removeprefix("torch.")
        return latents.float()

    reference = decoder_input_of(torch.float32, "sdpa")
    baseline = (decoder_input_of(torch.bfloat16, "sdpa") - reference).abs().max().item()
    for name in BACKENDS:
        try:
            select_backend("cuda", torch.bfloat16, name)
        except Exception:
            continue
        for permute in (False, True):
            err = (decoder_input_of(torch.bfloat16, name, permute) - reference).abs().max().item()
            print(f"{name} permute={permute}: {err:.3e} (bf16 sdpa {baseline:.3e})")
            assert err <= 2 * baseline + 1e-2


def test_cancel_frees_the_render_tensors_while_the_error_is_alive(engine, depth_image_64, monkeypatch):
    """After RenderCancelled, even with its traceback still held, no latent, control or text tensor of the render
    survives (on CUDA their memory goes back to the allocator); only the models stay, for the next render."""
    import gc
    import weakref

    from diffusers import FlowMatchEulerDiscreteScheduler

    from threedis.engine import denoise

    alive: dict[str, list] = {"control": [], "latents": [], "text": []}

    def tracked(kind, fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            alive[kind].append(weakref.ref(out[0] if isinstance(out, tuple) else out))
            return out
        return wrapper

    monkeypatch.setattr(denoise, "control_latents", tracked("control", denoise.control_latents))
    monkeypatch.setattr(denoise, "initial_latents", tracked("latents", denoise.initial_latents))
    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step",
                        tracked("latents", FlowMatchEulerDiscreteScheduler.step))

    def hook(module, args, kwargs):
        alive["text"].append(weakref.ref(kwargs["encoder_hidden_states"]))

    handle = engine.components.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    encoded: list[torch.Tensor] = []  # the encoder's own result is the caller's (on CPU, the same tensor)
    encode = engine.prompts.encode
    monkeypatch.setattr(engine.prompts, "encode", lambda *a, **k: (encoded.append(encode(*a, **k)), encoded[-1])[1])
    cancel = threading.Event()
    try:
        with pytest.raises(RenderCancelled) as caught:
            engine.render(two_birds(), depth=depth_image_64, steps=4, seed=0, options=RenderOptions(chunk=CHUNK), cancel=cancel,
                          on_step=lambda step, total, preview: cancel.set() if step == 2 else None)
    finally:
        handle.remove()
    gc.collect()
    assert caught.value is not None  # the traceback (and its frames) is still referenced here
    assert all(len(refs) > 0 for refs in alive.values())
    callers = {id(text.embeds) for text in encoded}
    survivors = {kind: sum(ref() is not None and id(ref()) not in callers for ref in refs)
                 for kind, refs in alive.items()}
    assert survivors == {"control": 0, "latents": 0, "text": 0}


@pytest.mark.parametrize("name", ["night_street", "reading_girl", "still_life", "two_birds"])
def test_shipped_example_layouts_render(engine, depth_image_64, name):
    """Every example layout, shrunk to <= 128 px, renders with the default chunk (200) and schedule."""
    from dataclasses import replace

    from threedis.engine.layout import example_path

    layout = Layout.load(example_path(name))
    scale = 128 / max(layout.width, layout.height)
    layout = replace(layout, width=int(layout.width * scale) // 16 * 16, height=int(layout.height * scale) // 16 * 16)
    with transformer_calls(engine.components.transformer) as calls:
        result = engine.render(layout, depth=depth_image_64, steps=2, seed=0)
    n = len(layout.instances)
    assert [c["text_len"] for c in calls] == [200 * (n + 1)] * 2  # default schedule: masked throughout
    tokens = calls[0]["call"].tokens
    image_member = tokens.member[tokens.text_len:]
    assert all(((image_member >> i) & 1).any() for i in range(n))  # every instance owns image tokens
    pixels = np.asarray(result.image, dtype=np.float32)
    assert result.image.size == (layout.width, layout.height) and np.isfinite(pixels).all() and pixels.std() > 0
