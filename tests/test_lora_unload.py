"""Engine.unload_loras: after it, renders are the plain model's again, and LoRAs can be loaded anew."""

from __future__ import annotations

import torch

from test_api import EXACT, decoder_input, layout, write_lora
from threedis.engine.api import Engine
from threedis.engine.api import RenderOptions


def _latents(engine: Engine, **render) -> torch.Tensor:
    """What the VAE decodes for one render: compared instead of 8-bit pixels."""
    with decoder_input(engine.components.vae) as seen:
        engine.render(layout(), **render)
    return seen[-1]


def test_unloading_loras_gives_the_no_lora_render_back(tiny_flux_dir, depth_image_64, tmp_path):
    render = dict(depth=depth_image_64, steps=2, seed=3, options=RenderOptions(chunk=16))
    plain = _latents(Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path,
                                            **EXACT), **render)

    engine = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path, **EXACT)
    write_lora(tmp_path / "a.safetensors", engine.components.transformer, seed=0)
    write_lora(tmp_path / "b.safetensors", engine.components.transformer, seed=1)
    engine.load_lora(tmp_path / "a.safetensors", scale=0.7)
    engine.load_lora(tmp_path / "b.safetensors", scale=0.5)
    with_loras = _latents(engine, **render)
    assert (with_loras - plain).abs().max() > 1e-3, "the LoRAs should change the render"

    engine.unload_loras()
    assert engine.loras == []
    assert not any(".lora_" in name for name, _ in engine.components.transformer.named_parameters())
    torch.testing.assert_close(_latents(engine, **render), plain, atol=1e-5, rtol=1e-5)

    engine.load_lora(tmp_path / "a.safetensors", scale=0.7)  # the names freed by unloading are reusable
    engine.load_lora(tmp_path / "b.safetensors", scale=0.5)
    torch.testing.assert_close(_latents(engine, **render), with_loras, atol=1e-5, rtol=1e-5)
    engine.unload_loras()
    engine.unload_loras()  # nothing loaded: a no-op
    torch.testing.assert_close(_latents(engine, **render), plain, atol=1e-5, rtol=1e-5)
