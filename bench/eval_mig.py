"""`threedis eval mig` throughput: images per second of the COCO-MIG measurement, models loaded once.

Scores --images synthetic 512 x 512 images (coloured rectangles on grey, a prompt of
2..6 instances each, COCO class names and the benchmark's colours) with the code path
of `threedis eval mig` (engine/eval/measure.py: detection batched over (image, class)
pairs, SAM over images), no cache. Reports model load time, seconds per image and
images per second over the whole set, peak VRAM, and what 800 prompts x 4 seeds
would take at that rate. The numbers that matter come from a GPU with the real
models (the default there); on a CPU it runs the tiny random-weight checkpoints,
which checks the script, not the speed.

Usage: python bench/eval_mig.py [--images 64] [--detector ID_OR_DIR] [--sam ID_OR_DIR] [--batch-size 16]
       [--device cuda] [--out bench/results]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from threedis.engine.eval.cache import ResultCache
from threedis.engine.eval.measure import measure_items
from threedis.engine.eval.models import GroundingDino, SamViT
from threedis.engine.eval.protocol import COLOURS, DEFAULT_DETECTOR, DEFAULT_SEGMENTER
from threedis.engine.eval.sources import EvalItem
from threedis.engine.eval.truth import TruthEntry, TruthInstance
from threedis.kernels.bench_attention import versions

NOUNS = ("cup", "dog", "bench", "teddy bear", "dining table", "bicycle", "vase", "apple", "car", "potted plant")
FILL = {"red": (220, 20, 20), "blue": (20, 40, 220), "green": (30, 200, 40), "yellow": (230, 220, 30),
        "black": (15, 15, 15), "white": (240, 240, 240), "brown": (140, 80, 20)}


def synthetic(folder: Path, count: int, seed: int = 0) -> list[EvalItem]:
    rng = np.random.default_rng(seed)
    items = []
    for n in range(count):
        level = 2 + n % 5
        image = np.full((512, 512, 3), 127, np.uint8)
        instances = []
        for _ in range(level):
            x0, y0 = rng.uniform(0, 0.7, 2)
            w, h = rng.uniform(0.15, 0.3, 2)
            colour, noun = COLOURS[rng.integers(len(COLOURS))], NOUNS[rng.integers(len(NOUNS))]
            box = (float(x0), float(y0), float(min(x0 + w, 1.0)), float(min(y0 + h, 1.0)))
            image[int(box[1] * 512):int(box[3] * 512), int(box[0] * 512):int(box[2] * 512)] = FILL[colour]
            instances.append(TruthInstance(colour, noun, box))
        path = folder / f"img_{n}.png"
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
        items.append(EvalItem(name=path.name, group="0", truth=TruthEntry(str(n), "synthetic", tuple(instances)),
                              image=path, status="done"))
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--detector", default=None, help=f"default {DEFAULT_DETECTOR} on CUDA, else the tiny one")
    parser.add_argument("--sam", default=None, help=f"default {DEFAULT_SEGMENTER} on CUDA, else the tiny one")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="detector batch (SAM: half); default 16 / 2")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if args.detector is None or args.sam is None:
        from threedis.engine.tiny.grounding_dino import tiny_grounding_dino_path
        from threedis.engine.tiny.sam_vit import tiny_sam_vit_path

        args.detector = args.detector or (DEFAULT_DETECTOR if cuda else str(tiny_grounding_dino_path()))
        args.sam = args.sam or (DEFAULT_SEGMENTER if cuda else str(tiny_sam_vit_path()))
    batch = args.batch_size or (16 if cuda else 2)
    loaded = {}

    def detector():
        start = time.perf_counter()
        model = GroundingDino.from_pretrained(args.detector, device=args.device, batch_size=batch)
        loaded["detector_s"] = time.perf_counter() - start
        return model

    def segmenter():
        start = time.perf_counter()
        model = SamViT.from_pretrained(args.sam, device=args.device, batch_size=max(1, batch // 2))
        loaded["sam_s"] = time.perf_counter() - start
        return model

    with tempfile.TemporaryDirectory(prefix="bench-eval-mig-") as tmp:
        items = synthetic(Path(tmp), args.images)
        if cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
        start = time.perf_counter()
        measure_items(items, detector, segmenter, ResultCache(None, []), progress=True)
        wall = time.perf_counter() - start
    measuring = wall - loaded.get("detector_s", 0.0) - loaded.get("sam_s", 0.0)
    row = {
        "bench": "eval_mig", "images": args.images, "instances": sum(i.truth.level for i in items),
        "detector": args.detector, "sam": args.sam, "batch_size": batch, "device": args.device,
        "gpu": torch.cuda.get_device_name(args.device) if cuda else platform.processor() or platform.machine(),
        "dtype": "float32", "load_s": loaded, "measure_s": measuring,
        "images_per_s": args.images / measuring, "s_per_image": measuring / args.images,
        "minutes_for_800x4": 3200 * measuring / args.images / 60,
        "peak_vram": int(torch.cuda.max_memory_allocated(args.device)) if cuda else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **versions(),
    }
    print(f"{args.images} images ({row['instances']} instances) on {row['gpu']}: {row['images_per_s']:.2f} images/s, "
          f"{row['s_per_image'] * 1000:.0f} ms/image after loading ({loaded}); 800 prompts x 4 seeds: "
          f"{row['minutes_for_800x4']:.1f} min" + (f"; peak VRAM {row['peak_vram'] / 2**30:.1f} GiB" if cuda else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"eval-mig-{'cuda' if cuda else 'cpu'}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.jsonl"
    with open(args.out / name, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(f"row: {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
