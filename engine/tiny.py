"""A tiny random-weight FLUX.1-Depth-dev checkpoint, written offline in seconds.

Why: every test of the engine (loading, offload, quantization, attention masks, the
zero-instance equality with diffusers) needs a real diffusers checkpoint, and the
real one is 30+ GB behind a gated hub. This writes one with the exact on-disk
layout of `black-forest-labs/FLUX.1-Depth-dev` (model_index.json naming
FluxControlPipeline, one folder per component, safetensors weights, CLIP BPE and
T5 sentencepiece tokenizers) but with a few hundred thousand random weights.

The tokenizers are trained here on a small built-in English corpus so prompts
split into many distinct tokens, as the real ones do; the text models' vocabularies
match them exactly.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import random
import shutil
import string
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import torch

TINY_VERSION = 1
MARKER = "threedis_tiny.json"  # written last: its presence means the checkpoint is complete
_DIR_NAME = f"tiny-flux-v{TINY_VERSION}"

_CLIP_MERGES = 510  # 256 bytes + 256 end-of-word bytes + merges + 2 specials = 1024
_CLIP_VOCAB = 2 * 256 + _CLIP_MERGES + 2
_T5_PIECES = 512  # sentencepiece pieces (pad, eos, unk included)
_T5_EXTRA_IDS = 100  # T5 sentinels, appended after the pieces as in the real tokenizer
_T5_VOCAB = _T5_PIECES + _T5_EXTRA_IDS

_ro = MappingProxyType

# Per-component constructor kwargs. Shapes follow FLUX.1-Depth-dev scaled down:
# 16 latent channels packed 2x2 -> 64; noisy + control latents -> 128 in, 64 out;
# 2 heads x 16 with rope axes 4 + 6 + 6 = 16; 4 VAE levels -> vae scale factor 8.
TINY_FLUX: Mapping[str, Mapping[str, Any]] = _ro({
    "transformer": _ro({
        "patch_size": 1, "in_channels": 128, "out_channels": 64,
        "num_layers": 2, "num_single_layers": 2,
        "attention_head_dim": 16, "num_attention_heads": 2,
        "joint_attention_dim": 32, "pooled_projection_dim": 32,
        "guidance_embeds": True, "axes_dims_rope": (4, 6, 6),
    }),
    "vae": _ro({
        "in_channels": 3, "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1,
        "act_fn": "silu", "latent_channels": 16, "norm_num_groups": 4,
        "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
        "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }),
    "text_encoder": _ro({
        "vocab_size": _CLIP_VOCAB, "hidden_size": 32, "intermediate_size": 64,
        "projection_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "bos_token_id": _CLIP_VOCAB - 2, "eos_token_id": _CLIP_VOCAB - 1,
        "pad_token_id": _CLIP_VOCAB - 1,
    }),
    "text_encoder_2": _ro({
        "vocab_size": _T5_VOCAB, "d_model": 32, "d_kv": 16, "d_ff": 64,
        "num_layers": 2, "num_heads": 2, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }),
    "scheduler": _ro({
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
        "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }),
    "tokenizer": _ro({"vocab_size": _CLIP_VOCAB, "model_max_length": 77}),
    "tokenizer_2": _ro({"vocab_size": _T5_VOCAB, "model_max_length": 512,
                        "extra_ids": _T5_EXTRA_IDS}),
})

_MODEL_INDEX = {
    "_class_name": "FluxControlPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# -- built-in corpus ------------------------------------------------------------------

_PASSAGE = """\
A quiet harbor at dawn, fishing boats resting on calm water while gulls circle above the old lighthouse.
Two children build a sandcastle near the waves, and their dog chases the foam along the shore.
The market square is crowded with merchants selling spices, fabrics, lanterns and fresh vegetables.
An astronaut floats inside a space station, holding a camera and looking back at the blue planet.
In the mountains, a wooden cabin sits beside a frozen lake under a sky full of bright stars.
A chef in a white apron slices tomatoes on a marble counter in a busy restaurant kitchen.
Autumn leaves cover the path through the park, where an elderly couple walks slowly holding hands.
The knight raises his shield as a green dragon lands on the castle wall, breathing smoke and fire.
On the desk there is a laptop, a notebook, a pencil, a cup of coffee and a small potted cactus.
A vintage red car is parked in front of a diner with neon signs glowing in the evening light.
Three cats sleep on a windowsill, warmed by the afternoon sunshine coming through lace curtains.
The orchestra performs in a grand concert hall with velvet seats and crystal chandeliers.
A hiker stands on a rocky cliff, wearing a yellow jacket and a heavy backpack, watching the clouds.
Under the ocean, colorful coral reefs shelter turtles, jellyfish, octopus and schools of silver fish.
A little girl in a raincoat jumps into puddles while her brother holds a striped umbrella.
The library has tall shelves, rolling ladders, reading lamps and thousands of leather books.
A farmer drives a tractor across golden wheat fields as a storm gathers on the horizon.
In a futuristic city, flying vehicles pass between glass skyscrapers and holographic billboards.
A bowl of ramen with noodles, egg, mushrooms, scallions and slices of pork on a wooden tray.
The painter mixes colors on a palette before adding details to a portrait of a smiling woman.
A steam train crosses a stone bridge over a deep valley covered in pine trees and mist.
Penguins gather on an iceberg while a whale surfaces nearby, spraying water into the cold air.
A birthday party with balloons, candles, presents, confetti and a chocolate cake with strawberries.
The museum displays dinosaur skeletons, ancient pottery, bronze armor and marble sculptures.
A cyclist rides through narrow streets lined with cafes, bakeries and flower shops in spring."""

_ADJ = (
    "red green blue yellow orange purple pink brown black white gray golden silver small large tiny huge "
    "old young ancient modern shiny dusty wooden glass metal stone plastic paper soft bright dark cozy quiet "
    "busy sunny rainy snowy foggy fluffy striped spotted wet dry warm cold fresh ripe rusty broken elegant "
    "simple colorful detailed realistic happy sad angry sleepy curious brave gentle wild tall short round "
    "square heavy light smooth rough transparent glowing magical mysterious peaceful crowded empty famous"
).split()
_NOUN = (
    "cat dog horse bird fish rabbit fox bear lion tiger elephant giraffe zebra monkey owl duck parrot squirrel "
    "apple banana orange lemon cherry grape peach pear watermelon bottle cup mug vase lamp chair table sofa bed "
    "book clock window door car bus bicycle motorcycle train boat ship plane helicopter tree flower rose tulip "
    "sunflower house castle tower bridge mountain river lake forest beach desert garden street city village "
    "robot astronaut knight wizard princess pirate girl boy woman man child teacher chef painter musician "
    "guitar piano violin drum trumpet hat scarf jacket dress shoe boot umbrella backpack candle pumpkin cake "
    "pizza bread cookie sandwich burger teapot kettle mirror painting statue fountain bench fence road field "
    "cloud moon star sun rainbow computer phone camera television keyboard basket bucket pillow blanket carpet "
    "teddy toy ball kite balloon crown sword shield map globe telescope microscope"
).split()
_PLACE = (
    "on a table|in a garden|on the beach|in a forest|on a street|in a kitchen|in a living room|under a tree|"
    "next to a window|on a hill|by the river|in the snow|at night|at sunset|in the rain|on a shelf|in a field|"
    "near a lake|in the city|on the grass|in a bedroom|inside a cave|on a rooftop|in a classroom|at the station"
).split("|")
_STYLE = (
    "photo|oil painting|watercolor|sketch|digital art|cinematic shot|studio photograph|illustration|"
    "3d render|close up|portrait|wide angle view|pencil drawing|anime style picture"
).split("|")
_VERB = (
    "sitting|standing|sleeping|running|jumping|flying|swimming|reading|playing|eating|looking|walking|"
    "resting|waiting|smiling|dancing|singing|climbing|hiding|painting"
).split("|")


def corpus() -> list[str]:
    """Prompt-like English lines: a hand-written passage, then templated captions.

    The last line holds every printable ASCII character so no ASCII prompt hits <unk>.
    """
    rng = random.Random(0)  # a local generator: the corpus never depends on the seed
    lines = _PASSAGE.splitlines()
    for i in range(3000):
        a, b = rng.sample(_ADJ, 2)
        n, m = rng.sample(_NOUN, 2)
        line = (f"a {rng.choice(_STYLE)} of a {a} {n} {rng.choice(_VERB)} {rng.choice(_PLACE)}, "
                f"with {rng.randint(1, 12)} {b} {m}s.")
        lines.append(line[0].upper() + line[1:] if i % 3 == 0 else line)
    lines.append(" ".join(string.printable.strip()))
    return lines


# -- tokenizers -----------------------------------------------------------------------

def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte -> printable character table, in CLIP's vocabulary order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in keep] + [chars[b] for b in range(256) if b not in keep]


def _merge_word(word: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _train_bpe(words: Mapping[str, int], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE with CLIP's end-of-word suffix; ties broken by the pair's text.

    Written here (not tokenizers' trainer) because that trainer breaks ties in a
    per-process hash order, and the checkpoint must be byte-identical every time.
    """
    vocab = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in words.items()}
    pairs: collections.Counter[tuple[str, str]] = collections.Counter()
    where: dict[tuple[str, str], set[tuple[str, ...]]] = collections.defaultdict(set)
    for word, c in vocab.items():
        for p in zip(word, word[1:]):
            pairs[p] += c
            where[p].add(word)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges and pairs:
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        for word in list(where.pop(best, ())):
            c = vocab.pop(word, 0)
            if not c:
                continue
            for p in zip(word, word[1:]):
                pairs[p] -= c
                if pairs[p] <= 0:
                    del pairs[p]
            new = _merge_word(word, *best)
            vocab[new] = vocab.get(new, 0) + c
            for p in zip(new, new[1:]):
                pairs[p] += c
                where[p].add(new)
    return merges


def write_clip_tokenizer(out: Path, lines: list[str]) -> None:
    """vocab.json + merges.txt in CLIP's order: bytes, bytes</w>, merges, specials."""
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # CLIP's own normaliser and byte-level split
    words: collections.Counter[str] = collections.Counter()
    for line in lines:
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            words[word] += 1
    merges = _train_bpe(words, _CLIP_MERGES)
    if len(merges) != _CLIP_MERGES:
        raise RuntimeError(f"tiny CLIP BPE learned {len(merges)} merges, expected {_CLIP_MERGES}")
    base = _bytes_to_unicode()
    tokens = base + [c + "</w>" for c in base] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    if len(vocab) != _CLIP_VOCAB:
        raise RuntimeError(f"tiny CLIP vocabulary has {len(vocab)} entries, expected {_CLIP_VOCAB}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "vocab.json", vocab, indent=None)
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    write_json(out / "special_tokens_map.json", specials)
    write_json(out / "tokenizer_config.json", {
        **specials, "model_max_length": TINY_FLUX["tokenizer"]["model_max_length"],
        "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"})


def _train_sentencepiece(lines: list[str]) -> bytes:
    """A unigram sentencepiece model with T5's ids (pad 0, eos 1, unk 2, no bos).

    Identity normalisation so tokenizer.json (no precompiled charsmap) and spiece.model
    split text identically.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=_T5_PIECES,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        normalization_rule_name="identity", character_coverage=1.0,
        num_threads=1, minloglevel=2)
    return buf.getvalue()


def _write_t5_tokenizer(out: Path, lines: list[str]) -> None:
    """spiece.model plus the tokenizers-backed files T5TokenizerFast loads first."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = _train_sentencepiece(lines)
    sp = spm.SentencePieceProcessor(model_proto=model)
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(_T5_EXTRA_IDS))]
    tok = T5Tokenizer(vocab=pieces, extra_ids=_T5_EXTRA_IDS,
                      model_max_length=TINY_FLUX["tokenizer_2"]["model_max_length"])
    if len(tok) != _T5_VOCAB:
        raise RuntimeError(f"tiny T5 tokenizer has {len(tok)} entries, expected {_T5_VOCAB}")
    tok.save_pretrained(out)
    (out / "spiece.model").write_bytes(model)
    write_json(out / "special_tokens_map.json",
                {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})


# -- models ---------------------------------------------------------------------------

def seeded(seed: int, offset: int) -> None:
    """Each component gets its own stream so adding one never shifts another's weights."""
    torch.manual_seed(seed * 1000 + offset)


def _write_models(path: Path, seed: int) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    seeded(seed, 1)
    FluxTransformer2DModel(**TINY_FLUX["transformer"]).save_pretrained(
        path / "transformer", safe_serialization=True)
    seeded(seed, 2)
    AutoencoderKL(**TINY_FLUX["vae"]).save_pretrained(path / "vae", safe_serialization=True)
    seeded(seed, 3)
    CLIPTextModel(CLIPTextConfig(**TINY_FLUX["text_encoder"])).save_pretrained(
        path / "text_encoder", safe_serialization=True)
    seeded(seed, 4)
    T5EncoderModel(T5Config(**TINY_FLUX["text_encoder_2"])).save_pretrained(
        path / "text_encoder_2", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(**TINY_FLUX["scheduler"]).save_pretrained(path / "scheduler")


@contextlib.contextmanager
def quiet_saves() -> Iterator[None]:
    """Hide transformers' per-shard progress bar while saving, restoring it afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def write_json(file: Path, obj: Any, indent: int | None = 2) -> None:
    file.write_text(json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


# -- public -------------------------------------------------------------------------------

def write_tiny_flux(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write the tiny checkpoint into `path` (created if needed) and return it.

    The same seed gives byte-identical weights. The caller's torch RNG state is
    restored afterwards, so writing never perturbs a test's own randomness.
    """
    import diffusers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).unlink(missing_ok=True)
    lines = corpus()
    write_clip_tokenizer(path / "tokenizer", lines)
    _write_t5_tokenizer(path / "tokenizer_2", lines)
    with torch.random.fork_rng(devices=[]), quiet_saves():
        _write_models(path, seed)
    write_json(path / "model_index.json", {**_MODEL_INDEX, "_diffusers_version": diffusers.__version__})
    write_json(path / MARKER, {"version": TINY_VERSION, "seed": seed})  # last: marks completeness
    return path


def is_tiny_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if `path` holds a complete checkpoint written by `write_tiny_flux`."""
    return (Path(path) / MARKER).is_file()


def cache_root() -> Path:
    env = os.environ.get("THREEDIS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "threedis"


def marker_version(path: Path, marker: str = MARKER) -> int | None:
    try:
        return json.loads((path / marker).read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError, AttributeError):
        return None


def cached_build(root: str | os.PathLike[str] | None, dir_name: str, version: int,
                 writer: Callable[[Path], Any], marker: str = MARKER) -> Path:
    """`root/dir_name` holding a complete checkpoint of `version`, built by `writer(folder)` if needed.

    Built in a temporary sibling folder and renamed into place, so a crash or a
    concurrent builder never leaves a half-written folder that looks complete.
    Shared by every tiny-checkpoint writer of the project.
    """
    base = Path(root) if root is not None else cache_root()
    target = base / dir_name
    if marker_version(target, marker) == version:
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dir_name}.", dir=base))
    try:
        writer(tmp)
        if target.exists() and marker_version(target, marker) != version:
            shutil.rmtree(target)  # incomplete or stale: replace it
        try:
            os.rename(tmp, target)
        except OSError:
            if marker_version(target, marker) != version:  # not a concurrent builder's result
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_flux_path(root: str | os.PathLike[str] | None = None) -> Path:
    """The cached tiny FLUX checkpoint under `root` (default $THREEDIS_CACHE or ~/.cache/threedis)."""
    return cached_build(root, _DIR_NAME, TINY_VERSION, write_tiny_flux)


__all__ = ["MARKER", "TINY_FLUX", "TINY_VERSION", "is_tiny_checkpoint", "tiny_flux_path", "write_tiny_flux"]
