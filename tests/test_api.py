"""Engine API: loading errors, outputs and metadata round-trip, LoRA, independent engines."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from threedis.engine import loading
from threedis.engine.api import Engine, default_schedule
from threedis.engine.errors import UserError
from threedis.engine.layout import Instance, Layout
from threedis.engine.outputs import read_metadata, render_kwargs_from_metadata, save_result
from threedis.kernels.rule import Schedule
from threedis.engine.api import RenderOptions

from closeness import assert_images_close

LORA_TARGETS = ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_k")
# Comparisons with models handed in as fp32 need fp32 weights and no step cache; the default
# (auto -> cpu) profile would store the transformer and T5 in bf16 and reuse blocks between steps.
EXACT = dict(dtype=torch.float32, overrides={"step_cache": "none"})


def layout() -> Layout:
    return Layout("a garden at dawn", 64, 64, (
        Instance("a red bird", (0.1, 0.2, 0.5, 0.8)),
        Instance("a blue jay", (0.5, 0.1, 0.9, 0.7)),
    ))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def engine(tiny_flux_dir, tmp_path_factory) -> Engine:
    cache = tmp_path_factory.mktemp("api-cache")
    return Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=cache, **EXACT)


@contextlib.contextmanager
def decoder_input(vae):
    seen: list[torch.Tensor] = []
    original = vae.decode
    vae.decode = lambda z, *a, **k: (seen.append(z.detach().clone()), original(z, *a, **k))[1]
    try:
        yield seen
    finally:
        del vae.decode


# ------------------------------------------------------------------ loading


def test_missing_parts_are_named_with_a_fix(tiny_flux_dir, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(tiny_flux_dir, root)
    (root / "text_encoder_2" / "model.safetensors").unlink()
    shutil.rmtree(root / "tokenizer_2")
    with pytest.raises(UserError) as err:
        Engine.from_pretrained(root, cache_dir=tmp_path / "c")
    message = str(err.value)
    assert "text_encoder_2/model.safetensors" in message and "tokenizer_2/" in message
    assert "hf download" in message and "threedis make-tiny" in message


def test_missing_shard_of_a_sharded_transformer(tiny_flux_dir, tmp_path):
    root = tmp_path / "sharded"
    shutil.copytree(tiny_flux_dir, root)
    folder = root / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "part-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "part-00001.safetensors", "b": "part-00002.safetensors"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="transformer/part-00002.safetensors"):
        loading.check_checkpoint(root)


def test_unknown_folder_and_offline_hub_id(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        Engine.from_pretrained(tmp_path / "nowhere" / "model", cache_dir=tmp_path)
    with pytest.raises(UserError, match="cannot get model"):
        Engine.from_pretrained("threedis-test/no-such-model", local_files_only=True, cache_dir=tmp_path)


def test_default_dtype_and_schedule():
    assert loading.default_dtype("cpu") == torch.float32
    assert loading.default_dtype("cuda") == torch.bfloat16
    assert default_schedule(20) == Schedule(steps=20, hard=20, i2i=4, i2t=20, t2i=20, t2t=20)
    assert default_schedule(2).i2i == 2


def test_from_components_with_text_encoders_in_memory(tiny_flux_dir, engine, depth_image_64, tmp_path):
    parts = loading.load_components(tiny_flux_dir, dtype=torch.float32, device="cpu", text_encoders=True)
    parts.source = None  # as if built in memory: nothing to reload from, no disk cache
    other = Engine.from_components(parts, device="cpu", backend="sdpa", cache_dir=tmp_path, **EXACT)
    a = other.render(layout(), depth=depth_image_64, steps=2, seed=4, options=RenderOptions(chunk=16))
    b = engine.render(layout(), depth=depth_image_64, steps=2, seed=4, options=RenderOptions(chunk=16))
    assert_images_close(pixels(a.image), pixels(b.image))  # other loading path: rounding may differ
    assert not list(tmp_path.rglob("*.safetensors"))


def test_size_not_multiple_of_16_is_refused(engine, depth_image_64):
    bad = layout()
    object.__setattr__(bad, "width", 72)  # get past the layout's own check
    with pytest.raises(UserError, match="multiple of 16"):
        engine.render(bad, depth=depth_image_64, steps=1)


# ------------------------------------------------------------------ outputs


def test_metadata_round_trip_rerenders_the_same_image(engine, depth_image_64, tmp_path):
    schedule = Schedule(steps=3, hard=2, i2i=1, i2t=3, t2i=2, t2t=3)
    result = engine.render(layout(), depth=depth_image_64.resize((40, 30)), seed=12, steps=3, guidance=7.5,
                           schedule=schedule, options=RenderOptions(chunk=12, append_instances=False))
    paths = save_result(result, tmp_path / "out")
    meta = read_metadata(paths["image"])
    assert meta["seed"] == 12 and meta["schedule"]["hard"] == 2 and meta["chunk"] == 12
    assert meta["model"] == str(engine.model_id) and meta["backend"] == "sdpa" and "version" in meta
    kwargs = render_kwargs_from_metadata(meta, depth=paths["depth"])
    again = engine.render(**kwargs)
    assert np.array_equal(pixels(again.image), pixels(result.image))


def test_saved_report_times_the_save(engine, depth_image_64, tmp_path):
    import json

    result = engine.render(layout(), depth=depth_image_64, steps=1, options=RenderOptions(chunk=8))
    paths = save_result(result, tmp_path)
    names = [s["name"] for s in json.loads(paths["report"].read_text())["stages"]]
    assert names[-1] == "save" and "step" in names
    assert "save" not in [s.name for s in result.report.stages]  # the returned report is not changed


def test_save_never_overwrites_silently(engine, depth_image_64, tmp_path):
    result = engine.render(layout(), depth=depth_image_64, steps=1, options=RenderOptions(chunk=8))
    first = save_result(result, tmp_path)
    assert {"image", "depth", "layout", "report"} <= set(first)
    before = {kind: path.read_bytes() for kind, path in first.items()}
    second = save_result(result, tmp_path)
    assert second["image"].name == "image-1.png" and second["report"].name == "report-1.json"
    assert all(path.read_bytes() == before[kind] for kind, path in first.items())
    assert all("-1." in path.name for path in second.values())  # the whole set shares one suffix
    third = save_result(result, tmp_path, overwrite=True)
    assert third["image"] == first["image"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".threedis-")]  # staging cleaned up


def test_read_metadata_of_a_foreign_png(tmp_path):
    from PIL import Image

    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(UserError, match="no threedis metadata"):
        read_metadata(path)


# ------------------------------------------------------------------ LoRA


def write_lora(path: Path, transformer, rank: int = 4, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A diffusers-format LoRA for two linears; returns target -> (down A [r, in], up B [out, r])."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    weights, out = {}, {}
    for target in LORA_TARGETS:
        linear = modules[target]
        down = torch.randn(rank, linear.in_features, generator=gen) * 0.5
        up = torch.randn(linear.out_features, rank, generator=gen) * 0.5
        weights[f"transformer.{target}.lora_A.weight"] = down
        weights[f"transformer.{target}.lora_B.weight"] = up
        out[target] = (down, up)
    save_file(weights, str(path))
    return out


def test_lora_matches_merged_weights_and_scale_zero_is_a_no_op(tiny_flux_dir, depth_image_64, tmp_path):
    from threedis.engine.lora import set_lora_scale

    base_engine = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path, **EXACT)
    render = dict(depth=depth_image_64, steps=2, seed=3, options=RenderOptions(chunk=16))
    with decoder_input(base_engine.components.vae) as seen:
        base_engine.render(layout(), **render)
    base = seen[-1]

    lora_engine = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path,
                                      **EXACT)
    pairs = write_lora(tmp_path / "tiny_lora.safetensors", lora_engine.components.transformer)
    name = lora_engine.load_lora(tmp_path / "tiny_lora.safetensors", scale=0.7)
    with decoder_input(lora_engine.components.vae) as seen:
        result = lora_engine.render(layout(), **render)
    with_lora = seen[-1]
    assert result.settings["loras"][0]["scale"] == 0.7
    assert (with_lora - base).abs().max() > 1e-3

    # independent reference: W += scale * up @ down, written into a plainly loaded transformer
    merged = loading.load_components(tiny_flux_dir, dtype=torch.float32, device="cpu")
    modules = dict(merged.transformer.named_modules())
    with torch.no_grad():
        for target, (down, up) in pairs.items():
            modules[target].weight += 0.7 * up @ down
    merged_engine = Engine.from_components(merged, device="cpu", backend="sdpa", cache_dir=tmp_path, **EXACT)
    with decoder_input(merged_engine.components.vae) as seen:
        merged_engine.render(layout(), **render)
    torch.testing.assert_close(with_lora, seen[-1], atol=1e-4, rtol=1e-4)

    set_lora_scale(lora_engine.components.transformer, name, 0.0)
    with decoder_input(lora_engine.components.vae) as seen:
        lora_engine.render(layout(), **render)
    torch.testing.assert_close(seen[-1], base, atol=1e-5, rtol=1e-5)


def test_lora_survives_a_transformer_freed_between_renders(tiny_flux_dir, depth_image_64, tmp_path):
    """A profile that frees the transformer after each render reloads it with the engine's LoRAs."""
    from dataclasses import replace

    from threedis.engine.profiles import apply_overrides, load_profile

    render = dict(depth=depth_image_64, steps=2, seed=3, options=RenderOptions(chunk=16))
    resident = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path, **EXACT)
    write_lora(tmp_path / "tiny_lora.safetensors", resident.components.transformer)
    resident.load_lora(tmp_path / "tiny_lora.safetensors", scale=0.7)
    with decoder_input(resident.components.vae) as seen:
        resident.render(layout(), **render)
    want = seen[-1]

    freed = apply_overrides(replace(load_profile("cpu")), {"transformer.device": "gpu-then-freed"})
    engine = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path, profile=freed,
                                    **EXACT)
    engine.load_lora(tmp_path / "tiny_lora.safetensors", scale=0.7)
    vae = engine.components.vae
    for _ in range(2):  # the second render loads the transformer again
        with decoder_input(vae) as seen:
            engine.render(layout(), **render)
        torch.testing.assert_close(seen[-1], want, atol=1e-5, rtol=1e-5)
    assert engine.models.placement()["transformer"]["loads"] == 2


def test_lora_on_fp8_storage(tiny_flux_dir, depth_image_64, tmp_path):
    """fp8 layerwise casting upcasts only base layers: LoRA matrices must not stay in fp8."""
    from threedis.engine.lora import set_lora_scale

    render = dict(depth=depth_image_64, steps=2, seed=3, options=RenderOptions(chunk=16))
    engine = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path, profile="cpu",
                                    overrides={"transformer.weights": "fp8", "step_cache": "none"})
    base = engine.render(layout(), **render).image
    write_lora(tmp_path / "tiny_lora.safetensors", engine.components.transformer)
    name = engine.load_lora(tmp_path / "tiny_lora.safetensors", scale=0.7)
    lora_dtypes = {p.dtype for n, p in engine.components.transformer.named_parameters() if ".lora_" in n}
    assert lora_dtypes == {torch.bfloat16}
    assert np.abs(pixels(engine.render(layout(), **render).image) - pixels(base)).max() > 0
    set_lora_scale(engine.components.transformer, name, 0.0)
    assert np.array_equal(pixels(engine.render(layout(), **render).image), pixels(base))


def test_lora_file_errors(engine, tmp_path):
    with pytest.raises(UserError, match="not found"):
        engine.load_lora(tmp_path / "missing.safetensors")
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(UserError, match="not a .safetensors"):
        engine.load_lora(tmp_path / "x.bin")
    save_file({"text_encoder.foo.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "te.safetensors"))
    with pytest.raises(UserError):
        engine.load_lora(tmp_path / "te.safetensors")
    for scale in (float("nan"), 1e30):  # refused at once, not blamed later on bf16 overflow and guidance
        with pytest.raises(UserError, match="LoRA scale"):
            engine.load_lora(tmp_path / "te.safetensors", scale=scale)
    assert engine.loras == []


# ------------------------------------------------------------------ independence


def test_two_engines_alternate_without_interference(tiny_flux_dir, depth_image_64, tmp_path):
    a = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path / "a")
    b = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path / "b")
    write_lora(tmp_path / "b_lora.safetensors", b.components.transformer, seed=1)
    b.load_lora(tmp_path / "b_lora.safetensors")
    other = Layout("a city street", 64, 64, (Instance("a yellow taxi", (0.2, 0.5, 0.8, 0.95)),))
    a1 = a.render(layout(), depth=depth_image_64, steps=2, seed=1, options=RenderOptions(chunk=16))
    b1 = b.render(other, depth=depth_image_64, steps=3, seed=2, options=RenderOptions(chunk=8, permute_tokens=True))
    a2 = a.render(layout(), depth=depth_image_64, steps=2, seed=1, options=RenderOptions(chunk=16))
    b2 = b.render(other, depth=depth_image_64, steps=3, seed=2, options=RenderOptions(chunk=8, permute_tokens=True))
    assert np.array_equal(pixels(a1.image), pixels(a2.image))
    assert np.array_equal(pixels(b1.image), pixels(b2.image))
    assert a1.settings["loras"] == [] and len(b1.settings["loras"]) == 1
    assert a.prompts is not b.prompts and a.components.transformer is not b.components.transformer


# ------------------------------------------------------------------ loading: half-downloaded files


def test_truncated_weight_file_is_named_before_loading(tiny_flux_dir, tmp_path):
    root = tmp_path / "partial"
    shutil.copytree(tiny_flux_dir, root)
    weights = root / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted download: header whole, tail missing
    with pytest.raises(UserError) as err:
        Engine.from_pretrained(root, cache_dir=tmp_path / "c")
    assert "incomplete vae/diffusion_pytorch_model.safetensors (truncated" in str(err.value)
    assert "hf download" in str(err.value)
    (root / "text_encoder" / "model.safetensors").write_bytes(b"\x10")
    with pytest.raises(UserError, match=r"text_encoder/model.safetensors \(truncated"):
        loading.check_checkpoint(root)


# ------------------------------------------------------------------ re-render from a PNG alone (CLI)


def test_cli_render_from_png_reproduces_it(tiny_flux_dir, depth_image_64, tmp_path):
    """`threedis render --from image-1.png` rebuilds the engine (model, weight formats, step cache, backend,
    LoRA) and the render (layout, seed, schedule, depth and user mask saved beside it) from the file."""
    from PIL import Image

    from threedis.engine.cli import main

    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:40, 4:36] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    scene = Layout("a garden at dawn", 64, 64, (
        Instance("a red bird", (0.0, 0.0, 0.7, 0.7), mask=str(tmp_path / "mask.png")),
        Instance("a blue jay", (0.5, 0.1, 0.9, 0.7)),
    ))
    engine = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path / "c", **EXACT)
    out = tmp_path / "out"
    out.mkdir()
    write_lora(out / "lora.safetensors", engine.components.transformer)  # beside the images: --from may read it
    engine.load_lora(out / "lora.safetensors", scale=0.6)
    schedule = Schedule(steps=2, hard=1, i2i=1, i2t=2, t2i=2, t2t=2)
    save_result(engine.render(scene, depth=depth_image_64, seed=1, steps=2, options=RenderOptions(chunk=8)), out)  # image.png, depth.png
    wanted = engine.render(scene, depth=depth_image_64.transpose(0), seed=9, steps=2, options=RenderOptions(chunk=12), schedule=schedule)
    image = save_result(wanted, out)["image"]
    assert image.name == "image-1.png"
    (tmp_path / "mask.png").unlink()  # moved away since: mask-0-1.png beside the image stands in

    again = tmp_path / "again"
    assert main(["render", "--from", str(image), "--out", str(again), "--device", "cpu"]) == 0
    meta = read_metadata(again / "image.png")
    assert meta["seed"] == 9 and meta["schedule"]["hard"] == 1 and meta["loras"][0]["scale"] == 0.6
    assert meta["rerendered_from"] == str(image.resolve())
    assert meta["placement"]["transformer"]["weights"] == "fp32" and meta["step_cache"]["kind"] == "none"
    assert_images_close(pixels(Image.open(again / "image.png")), pixels(wanted.image))  # another engine
    assert main(["render", "--from", str(image), "--seed", "3", "--out", str(again)]) == 2  # settings come from it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_on_a_streamed_transformer_runs_on_cuda(tiny_flux_dir, depth_image_64, tmp_path):
    """16gb streams fp8 blocks with diffusers' group offloading; LoRA matrices added later must reach the GPU."""
    render = dict(depth=depth_image_64, steps=2, seed=3, options=RenderOptions(chunk=16))
    engine = Engine.from_pretrained(tiny_flux_dir, device="cuda", cache_dir=tmp_path, profile="16gb",
                                    overrides={"step_cache": "none"})
    base = engine.render(layout(), **render).image
    write_lora(tmp_path / "tiny_lora.safetensors", engine.components.transformer)
    engine.load_lora(tmp_path / "tiny_lora.safetensors", scale=0.7)
    devices = {p.device.type for n, p in engine.components.transformer.named_parameters() if ".lora_" in n}
    assert devices == {"cuda"}
    assert np.abs(pixels(engine.render(layout(), **render).image) - pixels(base)).max() > 0


# ------------------------------------------------------------------ RenderResult.save


def test_result_save_writes_one_set_with_pictures_and_names(engine, depth_image_64, tmp_path):
    result = engine.render(layout(), depth=depth_image_64, steps=1, options=RenderOptions(chunk=8))
    first = result.save(tmp_path)
    assert {"image", "depth", "layout", "regions", "attention", "report", "report_text"} <= set(first)
    assert all(path.parent == tmp_path and path.is_file() for path in first.values())
    again = result.save(tmp_path)  # never replaces: the whole set moves to the next suffix
    assert again["image"].name == "image-1.png" and again["regions"].name == "regions-1.png"
    assert {p.name.partition(".")[0].endswith("-1") for p in again.values()} == {True}
    named = result.save(tmp_path / "named", prefix="seed-3", pictures=False)
    assert named["image"].name == "seed-3.png" and named["depth"].name == "seed-3-depth.png"
    assert "regions" not in named and not list((tmp_path / "named").glob(".threedis-*"))
    assert read_metadata(named["image"])["seed"] == result.seed
    for bad in ("../up", "a/b", "", ".hidden"):
        with pytest.raises(UserError, match="prefix"):
            result.save(tmp_path, prefix=bad)


def test_render_options_are_checked():
    with pytest.raises(UserError, match="chunk"):
        RenderOptions(chunk=0)
    with pytest.raises(UserError, match="permute_tokens"):
        RenderOptions(permute_tokens="yes")
