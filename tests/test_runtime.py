"""The runtime under a profile (CPU): residency bookkeeping, freeing, quantized cache, planner check.

On a CPU-only machine every "gpu" placement runs on the CPU, so residency is checked through
the manager's bookkeeping and weak references, and against the profile written in the test.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from threedis.engine import loading
from threedis.engine.api import Engine
from threedis.engine.errors import UserError
from threedis.engine.layout import Instance, Layout
from threedis.engine.offload import BlockOffloader
from threedis.engine.profiles import GIB, apply_overrides, load_profile
from threedis.engine.runtime import ModelManager
from threedis.engine.api import RenderOptions

from closeness import assert_images_close, assert_same_weights

CHUNK = 16
MODELS = ("transformer", "t5", "clip", "vae")


def bird(x0: float = 0.1) -> Layout:
    return Layout("a sunny garden", 64, 64, (Instance("a red bird", (x0, 0.2, x0 + 0.4, 0.8)),))


def stage_names(result) -> list[str]:
    return [s.name for s in result.report.stages]


def gpu_style_profile(**extra: str):
    """The 12gb recipe's residency on float weights: T5 loaded then freed, transformer model-offloaded."""
    return apply_overrides(load_profile("cpu"), {
        "t5.device": "gpu-then-freed", "clip.device": "gpu", "vae.device": "gpu",
        "transformer.device": "gpu", "transformer.offload": "model", "step_cache": "none", **extra,
    })


def test_auto_on_cpu_picks_cpu_and_says_why(tiny_flux_dir, tmp_path, depth_image_64):
    engine = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path)
    assert engine.profile.name == "cpu"
    assert engine.profile.origin.startswith("auto: picked cpu")
    result = engine.render(bird(), depth=depth_image_64, steps=2, seed=0, options=RenderOptions(chunk=CHUNK))
    assert result.settings["profile"] == "cpu" and "picked cpu" in result.settings["profile_origin"]
    assert "picked cpu" in result.report.info["profile origin"]
    # the cpu profile's own formats and tiling, not the loader's fp32 default
    placement = result.settings["placement"]
    assert {k: placement[k]["weights"] for k in MODELS} == {"transformer": "bf16", "t5": "bf16",
                                                            "clip": "fp32", "vae": "fp32"}
    assert all(placement[k]["device"] == "cpu" and placement[k]["on"] == "cpu" for k in MODELS)
    vae = engine.components.vae
    assert vae.use_tiling and vae.tile_sample_min_size == 512 and vae.tile_latent_min_size == 64
    # lazy loading inside the first render: every model has its load stage there
    names = stage_names(result)
    assert {f"load {k}" for k in MODELS} <= set(names)
    encode = names.index("encode")
    assert names.index("load t5") > encode and names.index("load clip") > encode  # nested in encode
    assert engine.components.transformer.dtype == torch.bfloat16


def test_residency_follows_the_profile(tiny_flux_dir, tmp_path, depth_image_64):
    profile = gpu_style_profile(**{"clip.device": "cpu"})  # one model the profile keeps on the CPU
    engine = Engine.from_pretrained(tiny_flux_dir, profile=profile, device="cpu", backend="sdpa", cache_dir=tmp_path)
    models = engine.models
    assert {k: models.placement()[k]["state"] for k in MODELS} == {k: "not loaded" for k in MODELS}
    t5_refs: list[weakref.ref] = []
    t5_state_when_transformer_loads: list[str] = []
    models.on_load("t5", lambda m: t5_refs.append(weakref.ref(m)))
    models.on_load("transformer", lambda m: t5_state_when_transformer_loads.append(models.placement()["t5"]["state"]))

    result = engine.render(bird(), depth=depth_image_64, steps=2, seed=0, options=RenderOptions(chunk=CHUNK))
    gc.collect()
    placement = result.settings["placement"]
    print({k: (v["device"], v["offload"], v["state"]) for k, v in placement.items()})
    assert placement["t5"]["state"] == "freed" and placement["t5"]["on"] is None
    assert len(t5_refs) == 1 and t5_refs[0]() is None  # nothing kept T5 alive after its stage
    assert t5_state_when_transformer_loads == ["freed"]  # T5 was gone before the transformer arrived
    assert placement["transformer"]["state"] == "parked"  # model offload: host RAM between stages
    assert placement["clip"]["state"] == placement["vae"]["state"] == "resident"
    cpu_models = [k for k in MODELS if placement[k]["device"] == "cpu"]
    assert cpu_models == ["clip"]
    for key in cpu_models:  # what the profile sends to cpu lives and runs on the cpu, whatever the engine
        assert placement[key]["run"] == placement[key]["home"] == placement[key]["on"] == "cpu"
    for key in ("transformer", "vae"):  # the "gpu" models run on the engine's device (here the CPU)
        assert placement[key]["run"] == "cpu"
    assert all(p.device.type == "cpu" for k in ("transformer", "clip", "vae")
               for p in models.loaded(k).parameters())

    # a new prompt needs T5 again: loaded a second time, freed again
    engine.render(Layout("a dark forest", 64, 64), depth=depth_image_64, steps=1, seed=0, options=RenderOptions(chunk=CHUNK))
    gc.collect()
    assert models.placement()["t5"]["loads"] == 2 and t5_refs[1]() is None


def test_text_encoders_are_not_loaded_on_a_prompt_cache_hit(tiny_flux_dir, tmp_path, depth_image_64, monkeypatch):
    Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path).render(
        bird(), depth=depth_image_64, steps=1, seed=0, options=RenderOptions(chunk=CHUNK))

    def refuse(*args, **kwargs):
        raise AssertionError("text encoder loaded despite a warm prompt cache")

    for name in ("load_t5", "load_clip", "load_t5_tokenizer", "load_clip_tokenizer"):
        monkeypatch.setattr(loading, name, refuse)
    second = Engine.from_pretrained(tiny_flux_dir, profile=gpu_style_profile(), device="cpu", backend="sdpa",
                                    cache_dir=tmp_path)
    result = second.render(bird(0.5), depth=depth_image_64, steps=1, seed=3, options=RenderOptions(chunk=CHUNK))
    assert not {"load t5", "load clip"} & set(stage_names(result))
    assert result.settings["placement"]["t5"]["state"] == "not loaded"
    assert result.report.info["text encoders loaded"] == {"clip": 0, "t5": 0}


def test_quantized_transformer_through_the_engine_hits_the_cache(tiny_flux_dir, tmp_path, depth_image_64):
    pytest.importorskip("optimum.quanto")
    overrides = {"transformer.weights": "quanto-int8", "step_cache": "none"}
    first = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path,
                                   overrides=overrides)
    a = first.render(bird(), depth=depth_image_64, steps=2, seed=5, options=RenderOptions(chunk=CHUNK))
    names = stage_names(a)
    assert {"load transformer", "read transformer", "quantize transformer"} <= set(names)
    assert a.report.info["quantized cache transformer"] == "miss (quanto-int8)"
    assert type(first.components.transformer.transformer_blocks[0].attn.to_q).__name__ == "QLinear"
    assert list((tmp_path / "quantized").glob("*/model.safetensors"))

    second = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path,
                                    overrides=overrides)
    b = second.render(bird(), depth=depth_image_64, steps=2, seed=5, options=RenderOptions(chunk=CHUNK))
    names = stage_names(b)
    assert "load transformer" in names and "quantize transformer" not in names and "read transformer" not in names
    assert b.report.info["quantized cache transformer"] == "hit (quanto-int8)"
    assert b.settings["placement"]["transformer"]["quantized_cache"] == "hit"
    # the cache holds what was quantized
    assert_same_weights(first.models.loaded("transformer"), second.models.loaded("transformer"))
    assert_images_close(a.image, b.image)  # fresh and reloaded tensors may take other kernel paths


def test_planner_check_names_the_stage_and_a_profile_that_fits(tiny_flux_dir):
    manager = ModelManager(load_profile("12gb"), "cpu", tiny_flux_dir)
    manager.check_fits(64, 64, 2, CHUNK, available_gpu_bytes=4 * GIB)  # plenty for the tiny models
    with pytest.raises(UserError) as err:
        manager.check_fits(64, 64, 2, CHUNK, available_gpu_bytes=1 << 20)
    message = str(err.value)
    print(message)
    assert "profile '12gb' needs" in message and "at stage '" in message and "0.00 GB is available" in message
    assert "--profile cpu" in message  # the only built-in that needs no GPU memory
    assert all(v["state"] == "not loaded" for v in manager.placement().values())


def test_planner_check_with_the_real_models():
    """FLUX.1-Depth-dev at 1024^2 with 9 instances: 24gb (resident fp8 transformer) does not fit 12 GB."""
    manager = ModelManager(load_profile("24gb"), "cpu", None)
    with pytest.raises(UserError, match=r"^profile '24gb' needs \d+\.\d\d GB of GPU memory at stage '\w+' "
                                        r"\(1024x1024, 9 instances\) but 12\.00 GB is available; "
                                        r"use --profile (16gb|12gb|8gb) \(predicted peak"):
        manager.check_fits(1024, 1024, 9, 200, available_gpu_bytes=12 * GIB)


def test_explicit_dtype_replaces_the_profile_formats(tiny_flux_dir, tmp_path):
    engine = Engine.from_pretrained(tiny_flux_dir, device="cpu", cache_dir=tmp_path, dtype=torch.float32)
    assert {v["weights"] for v in engine.models.placement().values()} == {"fp32"}
    assert engine.profile.name == "cpu" and engine.models.profile.origin.endswith("+ dtype fp32")
    assert engine.dtype == torch.float32


def test_block_offloader_keeps_two_groups_and_the_same_output(tiny_flux_dir):
    """Group offload bookkeeping on CPU (moves are no-ops; which group is 'on device' is tracked)."""
    transformer = loading.load_transformer(tiny_flux_dir, torch.float32)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(1, 16, 128, generator=g),        # [B, S, C]
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),  # [B, T, D]
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                  return_dict=False)
    with torch.no_grad():
        expected = transformer(**kwargs)[0]
        offloader = BlockOffloader(transformer, "cpu", blocks_per_group=1)
        got = transformer(**kwargs)[0]
        got_again = transformer(**kwargs)[0]
    assert torch.equal(got, expected) and torch.equal(got_again, expected)
    assert len(offloader.groups) == 4 and offloader.onloads == 8  # each group once per forward
    assert offloader.max_resident <= 2 and offloader.on_device == set()
    offloader.remove()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_models_stay_off_the_gpu_and_int8_moves_whole(tiny_flux_dir, tmp_path, depth_image_64):
    """On CUDA: a cpu-profiled model never reaches the GPU; int8 codes and scales follow model moves."""
    pytest.importorskip("bitsandbytes")
    from torch import nn

    from threedis.engine.offload import move_model
    from threedis.engine.quantize import QuantConfig, apply_quantization

    profile = apply_overrides(load_profile("12gb"), {"clip.device": "cpu", "t5.weights": "bf16"})
    engine = Engine.from_pretrained(tiny_flux_dir, profile=profile, device="cuda", backend="sdpa",
                                    cache_dir=tmp_path)
    result = engine.render(bird(), depth=depth_image_64, steps=2, seed=0, options=RenderOptions(chunk=CHUNK))
    placement = result.settings["placement"]
    assert placement["clip"]["on"] == "cpu"
    assert all(p.device.type == "cpu" for p in engine.models.loaded("clip").parameters())
    assert placement["transformer"]["state"] == "parked" and placement["transformer"]["on"] == "cpu"

    layer = apply_quantization(nn.Sequential(nn.Linear(128, 64)), QuantConfig("int8", torch.float16, skip=()))
    x = torch.randn(4, 128, dtype=torch.float16)
    with torch.no_grad():
        layer(x)  # a first forward hands CB/SCB to the layer's matmul state
        move_model(layer, "cuda")
        lin = layer[0]
        held = [t for t in (lin.weight.CB, lin.weight.SCB, lin.state.CB, lin.state.SCB) if t is not None]
        assert held and all(t.device.type == "cuda" for t in held)
        out = layer(x.cuda())
        move_model(layer, "cpu")
        assert lin.weight.device.type == "cpu" and lin.state.CB.device.type == "cpu"
    assert out.device.type == "cuda" and torch.isfinite(out).all()
