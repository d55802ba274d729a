"""Measure every image: read it at 512 px, detect each instance's class, segment the ones placed right.

Images go through in chunks: per chunk the detector gets every (image, class)
pair at once and batches them, then SAM embeds the images that need a colour
test in batches. An instance's class is detected once per image (the reference runs the
same detection once per instance: same input, same boxes). Results go to the cache
as each chunk finishes, so an interrupted evaluation loses at most one chunk, and
the models are only loaded when some image is not cached.
"""

from __future__ import annotations

import hashlib
import io
import sys
from typing import Callable, Sequence

import numpy as np

from threedis.engine.eval.boxes import iou_with
from threedis.engine.eval.cache import ResultCache
from threedis.engine.eval.colour import colour_fraction
from threedis.engine.eval.models import Detector, Segmenter
from threedis.engine.eval.protocol import EVAL_SIZE
from threedis.engine.eval.score import InstanceMeasure, judge
from threedis.engine.eval.sources import EvalItem
from threedis.engine.eval.truth import TruthEntry

CHUNK = 64  # images read and measured together


def read_image(data: bytes) -> np.ndarray:
    """Encoded image -> uint8 RGB [EVAL_SIZE, EVAL_SIZE, 3].

    Other sizes are resized as the reference's cv2.resize(INTER_LINEAR) does: bilinear
    with half-pixel centres and no antialiasing (to within one level of rounding).
    """
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as opened:
        rgb = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    if rgb.shape[:2] == (EVAL_SIZE, EVAL_SIZE):
        return rgb
    x = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]  # x: [1, 3, h, w]
    x = F.interpolate(x, size=(EVAL_SIZE, EVAL_SIZE), mode="bilinear", align_corners=False, antialias=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def measure_images(detector: Detector, segmenter: Segmenter,
                   images: Sequence[tuple[TruthEntry, np.ndarray]]) -> list[list[InstanceMeasure]]:
    """The measures of every instance of every (truth, image) pair."""
    pairs = [(i, noun) for i, (truth, _) in enumerate(images)
             for noun in dict.fromkeys(inst.noun for inst in truth.instances)]
    detections = detector.detect([images[i][1] for i, _ in pairs], [noun for _, noun in pairs])
    found = dict(zip(pairs, detections))
    placed: list[list[tuple[int, InstanceMeasure]]] = []  # per image: (instance index, measure so far)
    out: list[list[InstanceMeasure]] = []
    for i, (truth, _) in enumerate(images):
        row, need = [], []
        for j, inst in enumerate(truth.instances):
            boxes = found[(i, inst.noun)].boxes
            best = float(iou_with(boxes, np.asarray(inst.box) * EVAL_SIZE).max()) if len(boxes) else 0.0
            measure = InstanceMeasure(detections=len(boxes), best_iou=best)
            row.append(measure)
            if judge(measure).position:  # the reference segments only instances placed right
                need.append((j, measure))
        out.append(row)
        placed.append(need)
    masks = segmenter.masks([img for _, img in images],
                            [[np.asarray(images[i][0].instances[j].box) * EVAL_SIZE for j, _ in placed[i]]
                             for i in range(len(images))])
    for i, (truth, rgb) in enumerate(images):
        for (j, measure), mask in zip(placed[i], masks[i]):
            share, pixels = colour_fraction(rgb, mask, truth.instances[j].colour)
            out[i][j] = InstanceMeasure(measure.detections, measure.best_iou, share, pixels)
    return out


def measure_items(items: Sequence[EvalItem], detector: Callable[[], Detector], segmenter: Callable[[], Segmenter],
                  cache: ResultCache, progress: bool = True) -> dict[str, list[InstanceMeasure] | str]:
    """item name -> its instances' measures, or the reason it could not be read (then it counts as missing).

    detector / segmenter: called once, at the first image not in the cache.
    """
    from tqdm import tqdm

    todo = [item for item in items if item.status == "done"]
    results: dict[str, list[InstanceMeasure] | str] = {}
    models: list = []
    bar = tqdm(total=len(todo), desc="eval mig", unit="image", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for start in range(0, len(todo), CHUNK):
            fresh: dict[str, tuple[TruthEntry, np.ndarray]] = {}  # key -> what to measure, once per key
            waiting: list[tuple[EvalItem, str]] = []
            for item in todo[start:start + CHUNK]:
                try:
                    data = item.image.read_bytes()
                    sha = hashlib.sha256(data).hexdigest()
                    if item.sha256 is not None and sha != item.sha256:
                        results[item.name] = f"{item.image.name} changed since the batch wrote it (rerun the batch)"
                        bar.update(1)
                        continue
                    key = cache.key(sha, item.truth.key)
                    hit = cache.get(key)
                    if hit is not None:
                        results[item.name] = hit
                        bar.update(1)
                        continue
                    if key not in fresh:
                        fresh[key] = (item.truth, read_image(data))
                    waiting.append((item, key))
                except Exception as exc:  # noqa: BLE001 - one unreadable image is reported, the rest go on
                    results[item.name] = f"cannot read {item.image.name}: {type(exc).__name__}: {exc}"
                    bar.update(1)
            if not fresh:
                continue
            if not models:
                models.extend([detector(), segmenter()])
            for key, measures in zip(fresh, measure_images(models[0], models[1], list(fresh.values()))):
                cache.put(key, measures)
            for item, key in waiting:
                results[item.name] = cache.get(key)
                bar.update(1)
    finally:
        bar.close()
        cache.close()
    return results
