"""Tokenizers for the tiny checkpoints, trained here on a small built-in English corpus.

Why train them: prompts must split into many distinct tokens, as with the real CLIP
BPE and T5 sentencepiece tokenizers, so that chunking, truncation and the per-instance
token cells are exercised; the tiny text models' vocabularies match these exactly.
Shared by the tiny FLUX (CLIP + T5), LDM3D (CLIP) and Grounding DINO (BERT WordPiece) writers.
"""

from __future__ import annotations

import collections
import io
import random
import string
from pathlib import Path
from typing import Mapping

from threedis.engine.eval.protocol import COCO_CLASSES, COLOURS
from threedis.engine.tiny.store import write_json

_CLIP_MERGES = 510  # 256 bytes + 256 end-of-word bytes + merges + 2 specials = 1024
CLIP_VOCAB = 2 * 256 + _CLIP_MERGES + 2
CLIP_MAX_LENGTH = 77
_T5_PIECES = 512  # sentencepiece pieces (pad, eos, unk included)
T5_EXTRA_IDS = 100  # T5 sentinels, appended after the pieces as in the real tokenizer
T5_VOCAB = _T5_PIECES + T5_EXTRA_IDS
T5_MAX_LENGTH = 512

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


def write_clip_tokenizer(out: Path, lines: list[str], max_length: int = CLIP_MAX_LENGTH) -> None:
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
    if len(vocab) != CLIP_VOCAB:
        raise RuntimeError(f"tiny CLIP vocabulary has {len(vocab)} entries, expected {CLIP_VOCAB}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "vocab.json", vocab, indent=None)
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    write_json(out / "special_tokens_map.json", specials)
    write_json(out / "tokenizer_config.json", {
        **specials, "model_max_length": max_length,
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


def write_t5_tokenizer(out: Path, lines: list[str], max_length: int = T5_MAX_LENGTH) -> None:
    """spiece.model plus the tokenizers-backed files T5TokenizerFast loads first."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = _train_sentencepiece(lines)
    sp = spm.SentencePieceProcessor(model_proto=model)
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    tok = T5Tokenizer(vocab=pieces, extra_ids=T5_EXTRA_IDS,
                      model_max_length=max_length)
    if len(tok) != T5_VOCAB:
        raise RuntimeError(f"tiny T5 tokenizer has {len(tok)} entries, expected {T5_VOCAB}")
    tok.save_pretrained(out)
    (out / "spiece.model").write_bytes(model)
    write_json(out / "special_tokens_map.json",
                {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})


# The 80 COCO classes (the benchmark's nouns) and the benchmark's colours: whole tokens in the tiny BERT vocab.
COCO_WORDS = (*dict.fromkeys(" ".join(COCO_CLASSES).split()), *COLOURS, "a", "an", "the", "and", "of", "photo")
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


def bert_vocab(lines: list[str], words: int = 300) -> list[str]:
    """A WordPiece vocabulary laid out like bert-base-uncased's first 1,100 ids, then frequent whole words.

    Grounding DINO finds its phrase boundaries by token id ([CLS] 101, [SEP] 102, '.' 1012,
    '?' 1029: transformers' SPECIAL_TOKENS), so these sit where the real vocabulary has them:
    specials and [unusedN] up to 998, then the printable ASCII characters except upper case
    from 999 in code order, then '##' continuations of every letter and digit (any lower-case
    word can be spelled), then COCO's class words and the corpus's most frequent words.
    """
    by_id = {v: k for k, v in BERT_SPECIAL_IDS.items()}
    unused = iter(range(10_000))
    vocab = [by_id.get(i) or f"[unused{next(unused)}]" for i in range(999)]
    vocab += [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab += ["##" + c for c in string.digits + string.ascii_lowercase]
    counts: collections.Counter[str] = collections.Counter(
        w for line in lines for w in "".join(c if c.isalpha() else " " for c in line.lower()).split() if len(w) > 1)
    frequent = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    for word in dict.fromkeys([*COCO_WORDS, *frequent]):
        if len(vocab) >= 999 + 68 + 36 + words:
            break
        if len(word) > 1:
            vocab.append(word)
    return vocab


def write_bert_tokenizer(out: Path, vocab: list[str], max_length: int = 512) -> None:
    """tokenizer.json, tokenizer_config.json, vocab.txt and special_tokens_map.json, as a BERT hub repo has."""
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=max_length)
    if len(tok) != len(vocab):
        raise RuntimeError(f"tiny BERT tokenizer has {len(tok)} entries, expected {len(vocab)}")
    tok.save_pretrained(out)
    (out / "vocab.txt").write_text("".join(w + "\n" for w in vocab), encoding="utf-8")
    write_json(out / "special_tokens_map.json", {
        "cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"})
