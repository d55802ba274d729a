"""GPU check part 7: how long `threedis eval mig` takes on one GPU, without the real models.

The borrowed GPU machine has no network, so the hub's Grounding DINO and SAM cannot be
downloaded there: bench/eval_mig.py's `--random-real` builds both at their real sizes
(Swin-T 172M, ViT-H 641M parameters, float32 as the protocol) with random weights, and
this part times the command's own measurement path (engine/eval/measure.py, batched
16 (image, class) pairs / 8 SAM images as `threedis eval mig` does on a GPU) on
synthetic COCO-MIG-like images, after a warm-up: seconds per image (the detector's,
SAM's and the rest's shares), images per second, peak VRAM, and the minutes 800
prompts x 4 seeds would take. Each instance is counted as placed right, so SAM embeds
every image (the most work a run asks; bench/eval_mig.py says why). The number of timed
images is cut to what the time left allows. A dry run does the same on the CPU with the
tiny checkpoints' configs.
"""

from __future__ import annotations

import time
from typing import Any

from gpucheck_rows import first_line, float32_settings, is_fatal_cuda_error

IMAGES, WARMUP, BATCH = 64, 8, 16  # on CUDA: one chunk of measure_items; `threedis eval mig`'s GPU batch
DRY_IMAGES, DRY_WARMUP, DRY_BATCH = 3, 1, 2
BUILD_S = 40.0  # CUDA: import, both models built and initialised on the card, the tokenizer, the images
MIN_TIMED = 8  # fewer timed images than this say too little


def eval_mig(ctx: Any) -> None:
    """Part 7: one build row, then one timing row (or a row saying why not)."""
    import eval_mig as bench
    import torch

    cuda = ctx.device.type == "cuda"
    images, warmup, batch = (IMAGES, WARMUP, BATCH) if cuda else (DRY_IMAGES, DRY_WARMUP, DRY_BATCH)
    if not ctx.clock.fits(BUILD_S if cuda else 3.0):
        ctx.rows.not_measured("eval mig", f"budget: {ctx.clock.left():.0f} s left, building the models takes "
                                          f"~{BUILD_S if cuda else 3.0:.0f} s")
        return
    start = time.time()
    detector, segmenter, built = bench.random_models(ctx.device, batch, ctx.scratch, tiny=not cuda)
    ctx.rows.emit("eval mig models", **built, wall_s=round(time.time() - start, 1))
    items, boxes = bench.synthetic(ctx.scratch / "images", warmup + images)
    try:
        warm = bench.measure(items[:warmup], detector, segmenter, ctx.device, boxes)
        per_image = warm["s_per_image"]
        fits = int((ctx.clock.left() - 10) / per_image) if per_image > 0 else images
        timed = min(images, fits)
        if timed < (MIN_TIMED if cuda else 1):
            ctx.rows.not_measured("eval mig", f"budget: {ctx.clock.left():.0f} s left, {per_image:.2f} s an image "
                                              f"(warm-up): fewer than {MIN_TIMED} images fit", warmup=warm)
            return
        row = bench.measure(items[warmup:warmup + timed], detector, segmenter, ctx.device, boxes)
    except Exception as exc:  # noqa: BLE001 - out of memory or a failing path: a row, the goal table says so
        ctx.rows.emit("eval mig", "error", error=first_line(exc))
        if is_fatal_cuda_error(exc):
            raise
        return
    row.update(warmup_images=warmup, warmup_s_per_image=round(per_image, 4), images_cut=timed < images,
               dtype="float32", precision=float32_settings(), placement=bench.PLACED_RIGHT,
               tokenizer=bench.TOKENIZER_NOTE, weights=built["weights"], detector_batch=built["detector_batch"],
               sam_batch=built["sam_batch"])
    ctx.rows.emit("eval mig", **row)
    print(f"  {bench.summary({**row, 'gpu': bench.device_label(ctx.device)})}", flush=True)
    del detector, segmenter
    if cuda:
        torch.cuda.empty_cache()
