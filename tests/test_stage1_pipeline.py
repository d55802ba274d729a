"""Layout -> depth on the tiny LDM3D checkpoint (64x64, a few steps)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from threedis.engine.errors import UserError
from threedis.engine.stage1 import Stage1Cancelled, Stage1Pipeline
from threedis.engine.stage1.adapter import LayoutAdapter

PROMPT = "a cozy living room"
INSTANCES = ["a red sofa", "a tall lamp"]
BOXES = [(0.0, 0.5, 0.5, 1.0), (0.625, 0.125, 0.875, 0.75)]
FAST = dict(width=64, height=64, steps=3)


@pytest.fixture(scope="module")
def tiny_dir():
    from threedis.engine.tiny.ldm3d import tiny_ldm3d_path

    return tiny_ldm3d_path()


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return Stage1Pipeline.from_pretrained(tiny_dir, device="cpu", local_files_only=True)


def _inside(boxes, h, w):
    m = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        m[int(h * y0):int(h * y1), int(w * x0):int(w * x1)] = True
    return m


def test_tiny_writer_is_deterministic(tmp_path, tiny_dir):
    from threedis.engine.stage1.checkpoint import read_pickle_state
    from threedis.engine.tiny.ldm3d import write_tiny_ldm3d

    before = torch.random.get_rng_state()
    other = write_tiny_ldm3d(tmp_path / "again")
    assert torch.equal(before, torch.random.get_rng_state())
    for name in ("unet_0901.ckpt", "layout_adapter.ckpt"):
        a, b = read_pickle_state(tiny_dir / name), read_pickle_state(other / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_folder_is_an_ldm3d_checkpoint(tiny_dir):
    from diffusers import StableDiffusionLDM3DPipeline

    ref = StableDiffusionLDM3DPipeline.from_pretrained(tiny_dir)
    assert ref.vae.config.out_channels == 4 and ref.unet.config.in_channels == 4
    assert ref.unet.config.cross_attention_dim == ref.text_encoder.config.hidden_size


def test_output_size_range_and_determinism(pipe):
    a = pipe.generate(PROMPT, INSTANCES, BOXES, seed=3, **FAST)
    assert a.depth.size == (64, 64) and a.depth.mode == "L"
    assert a.rgb.size == (64, 64) and a.rgb.mode == "RGB"
    assert a.depth_array.dtype == np.float32 and 0.0 <= a.depth_array.min() and a.depth_array.max() <= 1.0
    assert np.array_equal(np.asarray(a.depth), np.round(a.depth_array * 255).astype(np.uint8))
    b = pipe.generate(PROMPT, INSTANCES, BOXES, seed=3, **FAST)
    assert np.array_equal(a.depth_array, b.depth_array)
    c = pipe.generate(PROMPT, INSTANCES, BOXES, seed=4, **FAST)
    assert not np.array_equal(a.depth_array, c.depth_array)


def test_non_square_size(pipe):
    r = pipe.generate(PROMPT, INSTANCES, BOXES, width=96, height=64, steps=2)
    assert r.depth.size == (96, 64) and r.depth_array.shape == (64, 96)


def test_adapter_changes_the_boxes(pipe):
    on = pipe.generate(PROMPT, INSTANCES, BOXES, seed=1, **FAST).depth_array
    off = pipe.generate(PROMPT, INSTANCES, BOXES, seed=1, migc_steps=0, refine=False, **FAST).depth_array
    shade_only = pipe.generate(PROMPT, INSTANCES, BOXES, seed=1, migc_steps=0, **FAST).depth_array
    inside = _inside(BOXES, 64, 64)
    assert np.abs(on - off)[inside].mean() > 1e-3
    assert np.abs(on - off)[inside].mean() > np.abs(on - off)[~inside].mean()
    assert np.abs(shade_only - off)[inside].mean() > 1e-4  # the refined shader alone acts too
    assert np.abs(on - shade_only)[inside].mean() > 1e-4


def test_adapter_off_ignores_instances(pipe):
    """migc_steps=0 with plain cross-attention is text-to-depth from the global prompt."""
    off = pipe.generate(PROMPT, INSTANCES, BOXES, seed=2, migc_steps=0, refine=False, append_instances=False,
                        **FAST)
    none = pipe.generate(PROMPT, [], [], seed=2, **FAST)
    # Not bit-exact: the text encoder runs a batch of N + 1 prompts in one, of 1 in the other (other GEMM
    # shapes); the tolerance is the one that diffusers' own pipeline meets below.
    np.testing.assert_allclose(off.depth_array, none.depth_array, atol=1e-5, rtol=0)


def test_no_instances_matches_diffusers_ldm3d(pipe, tiny_dir):
    from diffusers import StableDiffusionLDM3DPipeline, UNet2DConditionModel, UniPCMultistepScheduler

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    unet.load_state_dict(torch.load(tiny_dir / "unet_0901.ckpt", weights_only=True))
    ref = StableDiffusionLDM3DPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
        scheduler=UniPCMultistepScheduler.from_config(pipe.scheduler_config), safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    neg = "blurry"
    out = ref(PROMPT, negative_prompt=neg, num_inference_steps=4, guidance_scale=6.5, height=64, width=64,
              generator=torch.Generator().manual_seed(5), output_type="np")
    ours = pipe.generate(PROMPT, [], [], width=64, height=64, steps=4, negative_prompt=neg, seed=5)
    np.testing.assert_allclose(ours.depth_array, out.depth[0, ..., 0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.rgb) / 255.0, out.rgb[0], atol=1 / 255 + 1e-6)


def test_adapter_runs_exactly_migc_steps(pipe, monkeypatch):
    calls: list[int] = []
    step = [0]
    real = LayoutAdapter.forward

    def counting(self, *args, **kwargs):
        calls.append(step[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LayoutAdapter, "forward", counting)
    pipe.generate(PROMPT, INSTANCES, BOXES, width=64, height=64, steps=4, migc_steps=2,
                  on_step=lambda done, total: step.__setitem__(0, done))
    assert calls == [0] * 7 + [1] * 7  # 7 adapter layers on steps 0 and 1, none after


def test_progress_and_cancel(pipe):
    seen = []
    pipe.generate(PROMPT, INSTANCES, BOXES, on_step=lambda d, t: seen.append((d, t)), **FAST)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    cancel = threading.Event()

    def stop_after_two(done, total):
        if done == 2:
            cancel.set()

    with pytest.raises(Stage1Cancelled, match="before step 3 of 3"):
        pipe.generate(PROMPT, INSTANCES, BOXES, on_step=stop_after_two, cancel=cancel, **FAST)


def test_global_rng_untouched_and_phase_augment(pipe):
    state = torch.random.get_rng_state()
    r = pipe.generate(PROMPT, ["a cat", "a dog", "a hat"], [(0, 0, .5, .5), (.5, 0, 1, .5), (0, .5, 1, 1)],
                      width=64, height=64, steps=1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert r.settings["instance_prompts"][0] == "a cat, and a cat, and a cat"
    assert r.settings["prompt"] == PROMPT + ",a cat,a dog,a hat"


def test_user_errors(pipe):
    with pytest.raises(UserError, match="at most 29 instances"):
        pipe.generate(PROMPT, ["x"] * 30, [(0, 0, 1, 1)] * 30, **FAST)
    with pytest.raises(UserError, match="2 instance prompts but 1 boxes"):
        pipe.generate(PROMPT, INSTANCES, BOXES[:1], **FAST)
    with pytest.raises(UserError, match="box 1"):
        pipe.generate(PROMPT, INSTANCES, [BOXES[0], (0.5, 0.5, 0.4, 0.9)], **FAST)
    with pytest.raises(UserError, match="multiple of 8"):
        pipe.generate(PROMPT, INSTANCES, BOXES, width=60, height=64, steps=1)
    # beyond 29 instances without the adapter: refined shader only, allowed
    r = pipe.generate(PROMPT, ["x"] * 30, [(0, 0, 1, 1)] * 30, migc_steps=0, width=64, height=64, steps=1)
    assert r.depth.size == (64, 64)


def test_missing_parts_are_named(tmp_path):
    with pytest.raises(UserError, match="missing: unet/config.json"):
        Stage1Pipeline.from_pretrained(tmp_path, device="cpu", local_files_only=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_gpu(tiny_dir, pipe):
    gpu = Stage1Pipeline.from_pretrained(tiny_dir, device="cuda", local_files_only=True)
    assert gpu.dtype == torch.float16
    a = gpu.generate(PROMPT, INSTANCES, BOXES, seed=1, **FAST)
    b = gpu.generate(PROMPT, INSTANCES, BOXES, seed=1, **FAST)
    assert np.isfinite(a.depth_array).all() and a.depth.size == (64, 64)
    assert np.array_equal(a.depth_array, b.depth_array)
    cpu = pipe.generate(PROMPT, INSTANCES, BOXES, seed=1, **FAST)
    assert np.abs(a.depth_array - cpu.depth_array).mean() < 0.05  # fp16 vs fp32, same noise


def test_profile_entries_set_each_part_and_model(tiny_dir):
    """The engine's profile (ldm3d_* / sam2 / depth_estimator) decides formats and devices."""
    from threedis.engine.profiles import load_profile
    from threedis.engine.stages import AuxModels
    from threedis.engine.tiny.depth import tiny_depth_anything_path
    from threedis.engine.tiny.sam2 import tiny_sam2_path

    profile = load_profile("cpu", {"ldm3d_vae.weights": "bf16", "ldm3d_text.weights": "bf16",
                                   "sam2.weights": "bf16", "depth_estimator.weights": "fp32"})
    aux = AuxModels(stage1=tiny_dir, sam=tiny_sam2_path(), depth=tiny_depth_anything_path(), device="cpu",
                    local_files_only=True, profile=profile)
    got = aux.run("stage1", lambda p: (p.unet.dtype, p.vae.dtype, p.text_encoder.dtype,
                                       p.generate(PROMPT, INSTANCES, BOXES, width=64, height=64, steps=1)))
    assert got[:3] == (torch.float32, torch.bfloat16, torch.bfloat16)
    assert got[3].depth.size == (64, 64) and np.isfinite(got[3].depth_array).all()
    assert aux.run("sam", lambda m: next(m.model.parameters()).dtype) == torch.bfloat16
    assert aux.run("depth", lambda e: next(e.model.parameters()).dtype) == torch.float32
    assert aux.live == {}
    with pytest.raises(UserError, match="sam2.weights = 'quanto-int8' is not supported"):
        AuxModels(profile=load_profile("cpu", {"sam2.weights": "quanto-int8"}))


def test_engine_stage1_settings_reach_the_pipeline():
    """run_stage1 hands every Stage1Options field to generate (negative prompt included)."""
    from threedis.engine.layout import Instance, Layout
    from threedis.engine.profiler import Profiler
    from threedis.engine.stages import AuxModels, Stage1Options, run_stage1

    calls: list[dict] = []

    class Recorder:
        def generate(self, *args, **kwargs):
            calls.append(kwargs)
            return "depth"

    aux = AuxModels(stage1="somewhere")
    aux.loaders["stage1"] = lambda spec: Recorder()
    layout = Layout(PROMPT, 64, 64, (Instance(INSTANCES[0], BOXES[0]),))
    options = Stage1Options(steps=7, guidance=3.0, migc_steps=3, phase_augment=False, size=(64, 32), seed=9,
                            negative_prompt="blurry", refine_steps=5)
    assert run_stage1(aux, layout, options, False, Profiler(enabled=False)) == "depth"
    assert {k: calls[0][k] for k in ("width", "height", "steps", "guidance", "migc_steps", "phase_augment", "seed",
                                     "negative_prompt", "append_instances", "refine_steps")} == dict(
        width=64, height=32, steps=7, guidance=3.0, migc_steps=3, phase_augment=False, seed=9,
        negative_prompt="blurry", append_instances=False, refine_steps=5)
    run_stage1(aux, layout, Stage1Options(), True, Profiler(enabled=False))
    assert "negative_prompt" not in calls[1]  # the pipeline's default: the demos' negative prompt
    with pytest.raises(UserError, match="stage1_negative_prompt"):
        Stage1Options(negative_prompt=3)


# ------------------------------------------------------------------ the refined shader's step count


def _authors_branch(step: int, adapter_layer: bool, migc_steps_arg: int, naive_fuser_steps: int) -> str:
    """The branch the authors' MIGCProcessor takes in a cross-attention layer at step `step` (0-based `ith`),
    written from their code: a layer without MIGC is plain when `ith > NaiveFuserSteps`; a MIGC layer runs
    MIGC until `ith > MIGCsteps`, then is plain when `ith > NaiveFuserSteps`, else the refined shader."""
    not_use_migc = (not adapter_layer) or step > migc_steps_arg
    if not_use_migc and step > naive_fuser_steps:
        return "plain"
    return "shader" if not_use_migc else "adapter"


def _branches(pipe, monkeypatch, **kwargs) -> list[dict[str, int]]:
    """Per step: how many cross-attention layers took the adapter, the refined shader, or plain attention."""
    from threedis.engine.stage1.processors import CrossProcessor

    steps: list[dict[str, int]] = [{"adapter": 0, "shader": 0, "plain": 0}]
    real_shade, real_adapt = CrossProcessor._shade, CrossProcessor._adapt
    real_call = CrossProcessor.__call__

    def shade(*args):
        steps[-1]["shader"] += 1
        return real_shade(*args)

    def adapt(*args):
        steps[-1]["adapter"] += 1
        return real_adapt(*args)

    def call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, stage1=None):
        # (diffusers hands a processor only the keyword arguments its signature names)
        before = dict(steps[-1])
        out = real_call(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, stage1)
        if steps[-1] == before:
            steps[-1]["plain"] += 1
        return out

    monkeypatch.setattr(CrossProcessor, "_shade", staticmethod(shade))
    monkeypatch.setattr(CrossProcessor, "_adapt", staticmethod(adapt))
    monkeypatch.setattr(CrossProcessor, "__call__", call)
    from threedis.engine.stage1.processors import AdapterProcessor

    monkeypatch.setattr(AdapterProcessor, "__call__", call)
    pipe.generate(PROMPT, INSTANCES, BOXES, width=64, height=64,
                  on_step=lambda done, total: steps.append({"adapter": 0, "shader": 0, "plain": 0}), **kwargs)
    return steps[:-1]


@pytest.mark.parametrize("steps, migc_steps, refine_steps", [(5, 2, 4), (4, 0, 2), (4, 3, 2)])
def test_refined_shader_stops_at_refine_steps_as_the_authors_count(pipe, monkeypatch, steps, migc_steps,
                                                                   refine_steps):
    from threedis.engine.stage1.processors import ADAPTER_LAYERS

    layers = [name.removesuffix(".processor").rpartition(".")[0] for name in pipe.unet.attn_processors
              if name.endswith("attn2.processor")]
    adapter_layers = [name in ADAPTER_LAYERS for name in layers]
    got = _branches(pipe, monkeypatch, steps=steps, migc_steps=migc_steps, refine_steps=refine_steps)
    want = []
    for step in range(steps):  # the authors' MIGCsteps / NaiveFuserSteps are our counts minus one
        branches = [_authors_branch(step, a, migc_steps - 1, refine_steps - 1) for a in adapter_layers]
        want.append({kind: branches.count(kind) for kind in ("adapter", "shader", "plain")})
    assert got == want
    assert any(w["shader"] for w in want) and any(w["shader"] == 0 for w in want)  # the stop is inside the run


def test_refine_steps_ends_are_on_and_off_and_the_stop_keeps_the_earlier_steps(pipe, monkeypatch):
    from diffusers import UniPCMultistepScheduler

    trail: list[torch.Tensor] = []
    real_step = UniPCMultistepScheduler.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        trail.append(out.prev_sample.clone())
        return out

    monkeypatch.setattr(UniPCMultistepScheduler, "step", step)

    def run(**kwargs):
        trail.clear()
        depth = pipe.generate(PROMPT, INSTANCES, BOXES, seed=6, migc_steps=1, width=64, height=64, steps=4,
                              **kwargs).depth_array
        return depth, list(trail)

    on, on_trail = run()
    off, off_trail = run(refine=False)
    for count, want in ((None, on), (4, on), (1000, on), (0, off)):
        np.testing.assert_allclose(run(refine_steps=count)[0], want, atol=1e-6, rtol=0)
    two, two_trail = run(refine_steps=2)
    for i in range(2):  # steps 0 and 1: the shader, exactly as with it on throughout
        torch.testing.assert_close(two_trail[i], on_trail[i], atol=1e-6, rtol=0)
    assert (two_trail[2] - on_trail[2]).abs().max() > 1e-4  # step 2: plain attention from here on
    assert np.abs(two - on).max() > 1e-4 and np.abs(two - off).max() > 1e-4


def test_refine_steps_checks(pipe):
    from threedis.engine.stages import Stage1Options

    with pytest.raises(UserError, match="refine=False turns the refined shader off"):
        pipe.generate(PROMPT, INSTANCES, BOXES, refine=False, refine_steps=2, **FAST)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(UserError, match="refine_steps"):
            pipe.generate(PROMPT, INSTANCES, BOXES, refine_steps=bad, **FAST)
        with pytest.raises(UserError, match="refine_steps"):
            Stage1Options(refine_steps=bad)
    assert Stage1Options(refine_steps=0).refine_steps == 0 and Stage1Options().refine_steps is None
    settings = pipe.generate(PROMPT, INSTANCES, BOXES, refine_steps=99, **FAST).settings
    assert settings["refine_steps"] == 3  # every step of 3
