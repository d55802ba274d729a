"""SPEC section 2 text encoding and its on-disk cache, checked against diffusers' own prompt encoders."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from threedis.engine import loading
from threedis.engine.api import Engine
from threedis.engine.encoding import PromptEncoder
from threedis.engine.errors import UserError
from threedis.engine.layout import Instance, Layout
from threedis.engine.api import RenderOptions

from closeness import assert_images_close

PROMPTS = ["a sunny garden, a red bird, a blue jay on a branch", "a red bird", "a blue jay on a branch"]


@pytest.fixture(scope="module")
def pipe(tiny_flux_dir):
    from diffusers import FluxControlPipeline

    return FluxControlPipeline.from_pretrained(tiny_flux_dir, dtype=torch.float32)


def new_encoder(root, cache_dir) -> PromptEncoder:
    return PromptEncoder(root, torch.device("cpu"), torch.float32, cache_dir=cache_dir)


def t5_batches(encoder: PromptEncoder) -> list[int]:
    """Batch size of every T5 forward from now on (the encoder must be loaded)."""
    sizes: list[int] = []
    encoder.text.t5.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes


@pytest.mark.parametrize("chunk", [16, 200])
def test_chunks_equal_diffusers_encoding_of_each_prompt(tiny_flux_dir, tmp_path, pipe, chunk):
    encoder = new_encoder(tiny_flux_dir, tmp_path)
    text = encoder.encode(PROMPTS, chunk)
    dim = pipe.text_encoder_2.config.d_model
    assert text.embeds.shape == (1, 3 * chunk, dim)
    assert text.pooled.shape == (1, pipe.text_encoder.config.projection_dim)
    assert text.text_ids.shape == (3 * chunk, 3) and not text.text_ids.any()
    for k, prompt in enumerate(PROMPTS):
        # diffusers encodes one prompt to 512 tokens; our chunk k is its first `chunk` tokens
        reference = pipe._get_t5_prompt_embeds(prompt, max_sequence_length=512)[0, :chunk]
        torch.testing.assert_close(text.embeds[0, k * chunk:(k + 1) * chunk], reference, atol=1e-5, rtol=1e-5)
    pooled = pipe._get_clip_prompt_embeds(PROMPTS[0])
    torch.testing.assert_close(text.pooled, pooled, atol=1e-6, rtol=1e-6)
    assert text.global_only()[0].shape == (1, chunk, dim)


def test_encoders_run_once_batched_then_cache_hits(tiny_flux_dir, tmp_path):
    encoder = new_encoder(tiny_flux_dir, tmp_path)
    first = encoder.encode(PROMPTS[:1], 16)  # loads T5 and CLIP
    sizes = t5_batches(encoder)
    text = encoder.encode(PROMPTS, 16)
    assert sizes == [2]  # the two instance prompts, in one batch; the global one was cached
    torch.testing.assert_close(text.embeds[:, :16], first.embeds)
    encoder.encode(PROMPTS, 16)
    assert sizes == [2]  # all hits
    encoder.encode([PROMPTS[0], "a green parrot", PROMPTS[2]], 16)
    assert sizes == [2, 1]  # only the edited instance is encoded
    encoder.encode(PROMPTS, 8)
    assert sizes == [2, 1, 3]  # another chunk length is another key
    assert encoder.loads == {"clip": 1, "t5": 1}


def test_disk_cache_serves_a_new_encoder_without_loading(tiny_flux_dir, tmp_path, monkeypatch):
    expected = new_encoder(tiny_flux_dir, tmp_path).encode(PROMPTS, 16)

    def refuse(*args, **kwargs):
        raise AssertionError("text encoder loaded despite a warm cache")

    monkeypatch.setattr(loading, "load_t5", refuse)
    monkeypatch.setattr(loading, "load_clip", refuse)
    fresh = new_encoder(tiny_flux_dir, tmp_path)
    text = fresh.encode(PROMPTS, 16)
    assert fresh.loads == {"clip": 0, "t5": 0}
    assert torch.equal(text.embeds, expected.embeds) and torch.equal(text.pooled, expected.pooled)
    assert text.token_counts == expected.token_counts


def test_corrupt_cache_entries_are_rebuilt(tiny_flux_dir, tmp_path):
    expected = new_encoder(tiny_flux_dir, tmp_path).encode(PROMPTS, 16)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 4  # three T5 chunks + one pooled CLIP vector
    files[0].write_bytes(b"not a safetensors file")
    files[1].write_bytes(files[1].read_bytes()[:40])  # truncated
    fresh = new_encoder(tiny_flux_dir, tmp_path)
    text = fresh.encode(PROMPTS, 16)
    assert torch.equal(text.embeds, expected.embeds) and torch.equal(text.pooled, expected.pooled)
    for path in tmp_path.glob("*.safetensors"):
        load_file(str(path))  # every entry readable again


def test_changed_encoder_files_change_the_key(tiny_flux_dir, tmp_path):
    import os
    import shutil

    root = tmp_path / "model"
    shutil.copytree(tiny_flux_dir, root)
    cache = tmp_path / "cache"
    new_encoder(root, cache).encode(PROMPTS[:1], 16)
    config = root / "text_encoder_2" / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = new_encoder(root, cache)
    again.encode(PROMPTS[:1], 16)
    assert again.loads["t5"] == 1 and again.loads["clip"] == 0


def test_truncated_prompts_and_bad_chunk(tiny_flux_dir, tmp_path):
    encoder = new_encoder(tiny_flux_dir, tmp_path)
    long = " ".join(["a very long and detailed description of a small red bird"] * 6)
    text = encoder.encode(["short", long], 8)
    assert text.truncated == [1]
    for chunk in (0, 513, 2.5):
        with pytest.raises(UserError, match="chunk"):
            encoder.encode(["short"], chunk)


def test_engine_cache_hit_skips_text_encoders(tiny_flux_dir, tmp_path, monkeypatch, depth_image_64):
    layout = Layout("a sunny garden", 64, 64, (Instance("a red bird", (0.1, 0.2, 0.5, 0.8)),))
    first = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path)
    base = first.render(layout, depth=depth_image_64, steps=2, seed=1, options=RenderOptions(chunk=16))
    assert first.prompts.loads == {"clip": 1, "t5": 1}

    def refuse(*args, **kwargs):
        raise AssertionError("text encoder loaded despite a warm cache")

    monkeypatch.setattr(loading, "load_t5", refuse)
    monkeypatch.setattr(loading, "load_clip", refuse)
    second = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path)
    moved = Layout("a sunny garden", 64, 64, (Instance("a red bird", (0.4, 0.1, 0.9, 0.6)),))
    second.render(moved, depth=depth_image_64, steps=2, seed=2, options=RenderOptions(chunk=16))  # new seed, new box
    same = second.render(layout, depth=depth_image_64, steps=2, seed=1, options=RenderOptions(chunk=16))
    assert second.prompts.loads == {"clip": 0, "t5": 0}
    assert same.report.info["text encoders loaded"] == {"clip": 0, "t5": 0}
    assert_images_close(same.image, base.image)  # another engine: same embeddings, separately loaded models


def test_append_instances_flag_reaches_the_encoder(tiny_flux_dir, tmp_path, depth_image_64):
    engine = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path)
    seen: list[list[str]] = []
    original = engine.prompts.encode
    engine.prompts.encode = lambda prompts, chunk: (seen.append(list(prompts)), original(prompts, chunk))[1]
    layout = Layout("a garden", 64, 64, (Instance("a red bird", (0.1, 0.2, 0.5, 0.8)),))
    engine.render(layout, depth=depth_image_64, steps=1, options=RenderOptions(chunk=8))
    engine.render(layout, depth=depth_image_64, steps=1, options=RenderOptions(chunk=8, append_instances=False))
    assert seen == [["a garden,a red bird", "a red bird"], ["a garden", "a red bird"]]
