"""The tiny checkpoint must be a real diffusers FLUX depth checkpoint, tokenise like one,
and be reproducible byte for byte (the engine's equality tests rest on it)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from threedis.engine.tiny import flux
from threedis.engine.tiny import is_tiny_checkpoint, tiny_flux_path, write_tiny_flux

SENTENCE = "A watercolor of a happy dog sitting under a tree next to 3 red apples, at sunset."


def _hashes(root: Path, pattern: str = "**/*") -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob(pattern)) if p.is_file()}


# -- loads as diffusers / transformers ------------------------------------------------

def test_flux_control_pipeline_runs(tiny_flux_dir: Path, depth_image_64) -> None:
    from diffusers import FluxControlPipeline
    from PIL import Image

    pipe = FluxControlPipeline.from_pretrained(tiny_flux_dir)
    assert pipe.vae_scale_factor == 8
    out = pipe(prompt=SENTENCE, control_image=depth_image_64, height=64, width=64,
               num_inference_steps=2, guidance_scale=10.0,
               generator=torch.Generator().manual_seed(0))
    image = out.images[0]
    assert isinstance(image, Image.Image)
    assert image.size == (64, 64) and image.mode == "RGB"
    lo, hi = image.convert("L").getextrema()
    assert hi > lo  # random weights still decode to a non-constant picture


def test_components_load_with_their_own_classes(tiny_flux_dir: Path) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    d = tiny_flux_dir
    transformer = FluxTransformer2DModel.from_pretrained(d, subfolder="transformer")
    vae = AutoencoderKL.from_pretrained(d, subfolder="vae")
    clip = CLIPTextModel.from_pretrained(d, subfolder="text_encoder")
    t5 = T5EncoderModel.from_pretrained(d, subfolder="text_encoder_2")
    clip_tok = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer")
    t5_tok = T5TokenizerFast.from_pretrained(d, subfolder="tokenizer_2")
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(d, subfolder="scheduler")

    index = json.loads((d / "model_index.json").read_text())
    assert index["_class_name"] == "FluxControlPipeline"

    tc, vc = transformer.config, vae.config
    # FLUX depth: noisy latent and control latent, each 2x2-packed, side by side.
    assert tc.in_channels == 2 * tc.out_channels == 2 * 4 * vc.latent_channels
    assert vc.latent_channels == 16 and 2 ** (len(vc.block_out_channels) - 1) == 8
    assert vc.scaling_factor != 1.0 and vc.shift_factor not in (None, 0.0)
    assert tc.guidance_embeds
    assert sum(tc.axes_dims_rope) == tc.attention_head_dim
    assert tc.joint_attention_dim == t5.config.d_model
    assert tc.pooled_projection_dim == clip.config.hidden_size  # FLUX pools CLIP's pooler_output
    assert t5.config.vocab_size == len(t5_tok)
    assert clip.config.vocab_size == len(clip_tok)
    assert clip.config.eos_token_id == clip_tok.eos_token_id
    assert t5_tok.model_max_length == 512 and clip_tok.model_max_length == 77

    sc = sched.config
    assert (sc.shift, sc.use_dynamic_shifting, sc.base_shift, sc.max_shift,
            sc.base_image_seq_len, sc.max_image_seq_len) == (3.0, True, 0.5, 1.15, 256, 4096)

    weights = sorted(p.relative_to(d).as_posix() for p in d.glob("*/*.safetensors"))
    assert weights == ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                       "transformer/diffusion_pytorch_model.safetensors",
                       "vae/diffusion_pytorch_model.safetensors"]
    assert not list(d.glob("**/*.bin")) and not list(d.glob("**/*.pt"))


# -- tokenizers ------------------------------------------------------------------------

def test_t5_tokenizer_matches_sentencepiece(tiny_flux_dir: Path) -> None:
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(tiny_flux_dir / "tokenizer_2")
    ids = tok(SENTENCE).input_ids
    assert ids[-1] == tok.eos_token_id
    assert len(set(ids)) > 12 and tok.unk_token_id not in ids

    # Independent reference: the sentencepiece model itself, plus T5's trailing </s>.
    sp = spm.SentencePieceProcessor(model_file=str(tiny_flux_dir / "tokenizer_2" / "spiece.model"))
    for text in (SENTENCE, "Two cats and a robot in the kitchen", "An old wizard holding a glowing map."):
        assert tok(text).input_ids == sp.encode(text) + [sp.eos_id()]
    assert tok.decode(ids, skip_special_tokens=True) == SENTENCE

    padded = tok(SENTENCE, padding="max_length", max_length=512, truncation=True).input_ids
    assert len(padded) == 512
    assert padded[:len(ids)] == ids and set(padded[len(ids):]) == {tok.pad_token_id}


def _reference_clip_bpe(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """Textbook BPE for lower-case ASCII text: merge the best-ranked adjacent pair until none."""
    rank = {m: i for i, m in enumerate(merges)}
    ids = [vocab["<|startoftext|>"]]
    for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best == len(rank):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [vocab[p] for p in parts]
    return ids + [vocab["<|endoftext|>"]]


def test_clip_tokenizer_matches_reference_bpe(tiny_flux_dir: Path) -> None:
    from transformers import CLIPTokenizer

    folder = tiny_flux_dir / "tokenizer"
    tok = CLIPTokenizer.from_pretrained(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    merges = [tuple(line.split(" ")) for line in lines[1:]]

    ids = tok(SENTENCE).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(set(ids)) > 12 and tok.eos_token_id not in ids[1:-1]
    for text in (SENTENCE, "Two cats and a robot in the kitchen", "An old wizard holding a glowing map."):
        assert tok(text).input_ids == _reference_clip_bpe(text, vocab, merges)

    padded = tok(SENTENCE, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[:len(ids)] == ids
    assert set(padded[len(ids):]) == {tok.pad_token_id}


# -- determinism and the cache ---------------------------------------------------------

def test_same_seed_same_bytes(tiny_flux_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    write_tiny_flux(tmp_path / "again", seed=0)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's RNG is left alone

    assert _hashes(tmp_path / "again") == _hashes(tiny_flux_dir)
    other = write_tiny_flux(tmp_path / "seed1", seed=1)
    for name, digest in _hashes(tiny_flux_dir, "*/*.safetensors").items():
        assert _hashes(other, "*/*.safetensors")[name] != digest, name


@pytest.mark.slow
def test_same_bytes_in_a_fresh_process(tiny_flux_dir: Path, tmp_path: Path) -> None:
    """Hash-seeded orderings (Python sets, Rust maps) differ between processes, not within one."""
    out = tmp_path / "fresh"
    code = f"from threedis.engine.tiny import write_tiny_flux; write_tiny_flux({str(out)!r}, seed=0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert _hashes(out) == _hashes(tiny_flux_dir)


def test_cache_builds_once_and_rebuilds_when_incomplete(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("THREEDIS_CACHE", str(tmp_path))
    path = tiny_flux_path()
    assert path.parent == tmp_path and path.name.startswith("tiny-flux-v")
    assert is_tiny_checkpoint(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp folders left behind

    (path / "stray.txt").write_text("from the first build")
    assert tiny_flux_path(tmp_path) == path
    assert (path / "stray.txt").exists()  # complete: reused as is

    (path / flux.MARKER).unlink()
    assert not is_tiny_checkpoint(path)
    assert tiny_flux_path(tmp_path) == path
    assert is_tiny_checkpoint(path) and not (path / "stray.txt").exists()  # rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_crash_during_build_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    def boom(path: Path, seed: int) -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(flux, "_write_models", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_flux_path(tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert not is_tiny_checkpoint(tmp_path / "tiny-flux-v1")
