"""`threedis eval mig` throughput: images per second of the COCO-MIG measurement, models loaded once.

Scores --images synthetic 512 x 512 images (coloured rectangles on grey, a prompt of
2..6 instances each, 4 on average as in COCO-MIG, COCO class names and the benchmark's
colours) with the code path of `threedis eval mig` (engine/eval/measure.py: detection
batched over (image, class) pairs, SAM over images, colour tests), no cache, after
--warmup images through the same path. Reports seconds per image (and the detector's and
SAM's shares), images per second, peak VRAM, and what 800 prompts x 4 seeds would take.

Models:
  default        the real ones on CUDA (IDEA-Research/grounding-dino-tiny and
                 facebook/sam-vit-huge: a hub download, or --detector / --sam folders);
                 the tiny random-weight checkpoints on a CPU (a check of the script).
  --random-real  no download: Grounding DINO Swin-T and SAM ViT-H built at their real
                 sizes (172M and 641M parameters) from the bundled configs
                 (engine/configs/grounding_dino_tiny.json, sam_vit_huge.json, with their
                 preprocessor sizes: 800 px and 1024 px) with the library's random
                 initialisation, float32 like the protocol. The tokenizer is the tiny
                 checkpoints' BERT WordPiece vocabulary (1,403 entries, all ids in range of
                 the real 30,522): COCO's class words are whole tokens in it and '.' has
                 the real id, so a query has the real number of tokens. Random weights
                 detect nothing in particular, so each instance's true box is added to
                 what the detector found: every instance counts as placed right and SAM
                 embeds every image and prompts every box, the most work a run can ask of
                 it (a trained detector places most instances right, so a real run
                 embeds nearly every image too). The same arithmetic as the real models,
                 the figures that matter for the time on one GPU; the scores mean nothing.

Usage: python bench/eval_mig.py [--images 64] [--warmup 8] [--random-real] [--detector ID_OR_DIR]
       [--sam ID_OR_DIR] [--batch-size 16] [--device cuda] [--out bench/results]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from threedis.engine.eval.cache import ResultCache
from threedis.engine.eval.measure import measure_items
from threedis.engine.eval.models import Detections, Detector, GroundingDino, SamViT, Segmenter
from threedis.engine.eval.protocol import COCO_CLASSES, COLOURS, DEFAULT_DETECTOR, DEFAULT_SEGMENTER, EVAL_SIZE, POSITION_IOU
from threedis.engine.eval.sources import EvalItem
from threedis.engine.eval.truth import TruthEntry, TruthInstance
from threedis.kernels.bench_attention import versions

from gpucheck_rows import float32_settings  # bench/ is on sys.path: this file's folder

FILL = {"red": (220, 20, 20), "blue": (20, 40, 220), "green": (30, 200, 40), "yellow": (230, 220, 30),
        "black": (15, 15, 15), "white": (240, 240, 240), "brown": (140, 80, 20)}
RUNS = 800 * 4  # COCO-MIG's prompts x the seeds a user typically renders
PLACED_RIGHT = ("random weights: each instance's true box added to the detections, so SAM embeds every image and "
                "prompts every box (the most SAM work a run can ask)")
TOKENIZER_NOTE = ("the tiny checkpoints' BERT vocabulary (1,403 entries, ids in range of the real 30,522; COCO class "
                  "words whole tokens, '.' at the real id: queries have the real token counts)")


def _pixels_key(rgb: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest()


def synthetic(folder: Path, count: int, seed: int = 0) -> tuple[list[EvalItem], dict[str, dict[str, list]]]:
    """`count` PNG images in `folder` with their ground truth; and, per image (by its pixels), each class's true
    boxes in pixels (what PlacedRight adds to the detections)."""
    rng = np.random.default_rng(seed)
    items, boxes = [], {}
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        level = 2 + n % 5
        image = np.full((EVAL_SIZE, EVAL_SIZE, 3), 127, np.uint8)
        instances = []
        for _ in range(level):
            x0, y0 = rng.uniform(0, 0.7, 2)
            w, h = rng.uniform(0.15, 0.3, 2)
            colour, noun = COLOURS[rng.integers(len(COLOURS))], COCO_CLASSES[rng.integers(len(COCO_CLASSES))]
            box = (float(x0), float(y0), float(min(x0 + w, 1.0)), float(min(y0 + h, 1.0)))
            image[int(box[1] * EVAL_SIZE):int(box[3] * EVAL_SIZE), int(box[0] * EVAL_SIZE):int(box[2] * EVAL_SIZE)] \
                = FILL[colour]
            instances.append(TruthInstance(colour, noun, box))
        by_class: dict[str, list] = {}
        for inst in instances:
            by_class.setdefault(inst.noun, []).append([v * EVAL_SIZE for v in inst.box])
        boxes[_pixels_key(image)] = by_class
        path = folder / f"img_{n}.png"
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")  # lossless: measure_items reads back these very pixels
        path.write_bytes(buf.getvalue())
        items.append(EvalItem(name=path.name, group="0", truth=TruthEntry(str(n), "synthetic", tuple(instances)),
                              image=path, status="done"))
    return items, boxes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedDetector:
    """The detector as measure_items calls it, timed; with `place_right`, each query's true boxes are added to what it
    found (random weights: every instance placed right, so SAM gets every instance, as --random-real documents)."""

    def __init__(self, inner: Detector, device: torch.device, place_right: dict[str, dict[str, list]] | None) -> None:
        self.inner, self.device, self.place_right = inner, device, place_right
        self.seconds, self.pairs, self.found = 0.0, 0, 0

    def detect(self, images: Sequence[np.ndarray], queries: Sequence[str]) -> list[Detections]:
        _sync(self.device)
        start = time.perf_counter()
        out = self.inner.detect(images, queries)
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        self.pairs += len(queries)
        self.found += sum(len(d.boxes) for d in out)
        if self.place_right is None:
            return out
        added = []
        for image, query, det in zip(images, queries, out):
            true = np.asarray(self.place_right[_pixels_key(image)][query], dtype=np.float64).reshape(-1, 4)
            added.append(Detections(np.concatenate([det.boxes.reshape(-1, 4), true]),
                                    np.concatenate([det.scores, np.ones(len(true))])))
        return added


class TimedSegmenter:
    """SAM as measure_items calls it, timed, counting the images it embeds and the boxes it prompts."""

    def __init__(self, inner: Segmenter, device: torch.device) -> None:
        self.inner, self.device = inner, device
        self.seconds, self.images, self.boxes = 0.0, 0, 0

    def masks(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Sequence[float]]]) -> list[list[np.ndarray]]:
        _sync(self.device)
        start = time.perf_counter()
        out = self.inner.masks(images, boxes)
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        self.images += sum(1 for b in boxes if len(b))
        self.boxes += sum(len(b) for b in boxes)
        return out


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def random_models(device: torch.device, batch_size: int, scratch: Path, tiny: bool = False,
                  seed: int = 0) -> tuple[GroundingDino, SamViT, dict[str, Any]]:
    """Grounding DINO and SAM with random weights on `device`, float32, wrapped as `threedis eval mig` wraps them.

    Real sizes from the bundled configs (their `_preprocessor`: the real input sizes), or, with `tiny`, the tiny
    checkpoints' configs and preprocessor files (a CPU check of this code). Returns the detector (batch_size
    pairs a batch), SAM (half of it) and what was built: parameters, build seconds, weights GiB.
    """
    from transformers import AutoTokenizer

    from threedis.engine.config_check import read_json
    from threedis.engine.planner import instantiate, load_config
    from threedis.engine.tiny.text import bert_vocab, corpus, write_bert_tokenizer

    if tiny:
        from threedis.engine.tiny.grounding_dino import tiny_grounding_dino_path
        from threedis.engine.tiny.sam_vit import tiny_sam_vit_path

        folders = {"detector": tiny_grounding_dino_path(), "sam": tiny_sam_vit_path()}
        configs = {k: load_config(v) for k, v in folders.items()}
        prep = {k: read_json(k, v / "preprocessor_config.json") for k, v in folders.items()}
    else:
        configs = {"detector": load_config("grounding_dino_tiny"), "sam": load_config("sam_vit_huge")}
        prep = {k: dict(v["_preprocessor"]) for k, v in configs.items()}
    words = scratch / "tokenizer"
    words.mkdir(parents=True, exist_ok=True)
    write_bert_tokenizer(words, bert_vocab(corpus()))  # the tiny checkpoints' vocabulary (module docstring)
    tokenizer = AutoTokenizer.from_pretrained(words, local_files_only=True)
    built: dict[str, Any] = {"build_s": {}, "params": {}}
    models = {}
    cuda_index = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    for i, key in enumerate(("detector", "sam")):
        _sync(device)
        start = time.perf_counter()
        with torch.random.fork_rng(devices=cuda_index):  # the caller's RNG state is left as it was
            torch.manual_seed(seed + i)
            model = instantiate(configs[key], key, device).to(device)  # every tensor there, stray ones too
        models[key] = model.eval().requires_grad_(False)
        _sync(device)
        built["build_s"][key] = round(time.perf_counter() - start, 2)
        built["params"][key] = _params(model)
    text_vocab = models["detector"].config.text_config.vocab_size
    if len(tokenizer) > text_vocab:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, the text encoder {text_vocab}")
    built["weights_gb"] = round(sum(p.numel() * p.element_size() for m in models.values()
                                    for p in m.parameters()) / 2**30, 3)
    detector = GroundingDino.from_model(models["detector"], tokenizer, prep["detector"], device, batch_size)
    segmenter = SamViT.from_model(models["sam"], prep["sam"], device, max(1, batch_size // 2))
    built.update(weights=f"random, {'tiny configs' if tiny else 'real sizes'}", detector_side=detector.side,
                 sam_side=segmenter.longest, detector_batch=detector.batch_size, sam_batch=segmenter.batch_size)
    return detector, segmenter, built


def measure(items: Sequence[EvalItem], detector: Detector, segmenter: Segmenter, device: torch.device,
            place_right: dict[str, dict[str, list]] | None, progress: bool = False) -> dict[str, Any]:
    """Time `threedis eval mig`'s measurement of `items` (no cache) with these models; the figures of one row."""
    timed_d = TimedDetector(detector, device, place_right)
    timed_s = TimedSegmenter(segmenter, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    results = measure_items(items, lambda: timed_d, lambda: timed_s, ResultCache(None, []), progress=progress)
    _sync(device)
    wall = time.perf_counter() - start
    unread = [r for r in results.values() if isinstance(r, str)]
    if unread:
        raise RuntimeError(f"{len(unread)} synthetic images not measured: {unread[0]}")
    n = len(items)
    measures = [m for r in results.values() for m in r]
    return {
        "images": n, "instances": sum(i.truth.level for i in items), "detector_pairs": timed_d.pairs,
        "measure_s": round(wall, 3), "s_per_image": wall / n, "images_per_s": n / wall,
        "minutes_for_800x4": RUNS * wall / n / 60,
        "detector_s_per_image": timed_d.seconds / n, "sam_s_per_image": timed_s.seconds / n,
        "other_s_per_image": (wall - timed_d.seconds - timed_s.seconds) / n,
        "detector_boxes_per_pair": timed_d.found / max(1, timed_d.pairs),
        "sam_images": timed_s.images, "sam_boxes": timed_s.boxes,
        "placed_right": sum(m.best_iou >= POSITION_IOU for m in measures) / max(1, len(measures)),
        "mask_pixels_median": statistics.median([m.mask_pixels for m in measures]) if measures else None,
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 2**30, 3) if cuda else None,
    }


def _loaded_models(args: argparse.Namespace, batch: int) -> tuple[Any, Any, dict[str, Any]]:
    """The real models (CUDA default) or the tiny checkpoints (CPU default), loaded as `threedis eval mig` loads."""
    cuda = torch.device(args.device).type == "cuda"
    if args.detector is None or args.sam is None:
        from threedis.engine.tiny.grounding_dino import tiny_grounding_dino_path
        from threedis.engine.tiny.sam_vit import tiny_sam_vit_path

        args.detector = args.detector or (DEFAULT_DETECTOR if cuda else str(tiny_grounding_dino_path()))
        args.sam = args.sam or (DEFAULT_SEGMENTER if cuda else str(tiny_sam_vit_path()))
    built: dict[str, Any] = {"load_s": {}}
    start = time.perf_counter()
    detector = GroundingDino.from_pretrained(args.detector, device=args.device, batch_size=batch)
    built["load_s"]["detector"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    segmenter = SamViT.from_pretrained(args.sam, device=args.device, batch_size=max(1, batch // 2))
    built["load_s"]["sam"] = round(time.perf_counter() - start, 2)
    built.update(weights="loaded", detector=args.detector, sam=args.sam, params={
        "detector": _params(detector.model), "sam": _params(segmenter.model)})
    return detector, segmenter, built


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images timed (default 64)")
    parser.add_argument("--warmup", type=int, default=None, help="images measured first, untimed (default 8 on "
                        "CUDA, 1 on a CPU)")
    parser.add_argument("--random-real", action="store_true", help="real-size models with random weights from the "
                        "bundled configs: no download (see the top of this file)")
    parser.add_argument("--detector", default=None, help=f"default {DEFAULT_DETECTOR} on CUDA, else the tiny one")
    parser.add_argument("--sam", default=None, help=f"default {DEFAULT_SEGMENTER} on CUDA, else the tiny one")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="detector batch (SAM: half); default 16 / 2")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.random_real and (args.detector or args.sam):
        parser.error("--random-real builds its own models: leave out --detector and --sam")
    if args.images < 1:
        parser.error("--images must be at least 1")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (16 if cuda else 2)  # `threedis eval mig`'s defaults
    warmup = args.warmup if args.warmup is not None else (8 if cuda else 1)
    with tempfile.TemporaryDirectory(prefix="bench-eval-mig-") as tmp:
        if args.random_real:
            detector, segmenter, built = random_models(device, batch, Path(tmp))
        else:
            detector, segmenter, built = _loaded_models(args, batch)
        items, boxes = synthetic(Path(tmp) / "images", warmup + args.images)
        place_right = boxes if args.random_real else None
        if warmup:
            measure(items[:warmup], detector, segmenter, device, place_right)
        row = measure(items[warmup:], detector, segmenter, device, place_right, progress=True)
    row = {"bench": "eval_mig", "mode": "random-real" if args.random_real else "loaded", **built, **row,
           "warmup_images": warmup, "device": args.device, "gpu": device_label(device), "dtype": "float32",
           "precision": float32_settings(), "tokenizer": TOKENIZER_NOTE if args.random_real else "the model's",
           "placement": PLACED_RIGHT if args.random_real else "the detector's own",
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **versions()}
    print(summary(row))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"eval-mig-{'cuda' if cuda else 'cpu'}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.jsonl"
    with open(args.out / name, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(f"row: {args.out / name}")
    return 0


def summary(row: dict[str, Any]) -> str:
    """One line for people: the rate, its split, the 800 x 4 minutes and the peak."""
    peak = row.get("peak_allocated_gb")
    return (f"{row['images']} images ({row['instances']} instances, {row['detector_pairs']} detector pairs) on "
            f"{row['gpu']}: {row['images_per_s']:.2f} images/s, {row['s_per_image'] * 1000:.0f} ms/image "
            f"(detector {row['detector_s_per_image'] * 1000:.0f}, SAM {row['sam_s_per_image'] * 1000:.0f}, "
            f"other {row['other_s_per_image'] * 1000:.0f}); 800 prompts x 4 seeds: {row['minutes_for_800x4']:.1f} min"
            + (f"; peak VRAM {peak:.1f} GiB allocated" if peak is not None else ""))


if __name__ == "__main__":
    raise SystemExit(main())
