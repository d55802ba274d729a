"""GPU check parts 5 and 6: whole renders per memory profile under emulated card sizes, stage 1 and SAM2.

Part 5 renders 1024^2 layouts with 9 and 4 instances through bench/pipeline.py's
`run_row` with random real-size weights (`--random-real`: FLUX.1-Depth-dev, T5-XXL,
CLIP-L and the VAE from the bundled configs): the 12gb profile under a 12 GB cap, the
resident baseline (12gb's formats, no offload, no cap), 8gb under 8 GB and 16gb under
16 GB, most valuable first, each row started only when the time the last one took still
fits. A profile that does not fit its cap is a row (render_status says how it failed),
not a crash. Part 6 runs stage 1 (LDM3D-4c UNet + layout adapter, 512^2, the authors'
30 steps) once in fp32 (the authors' precision) and once in the profiles' fp16 from the
same weights (the fp32 ones rounded, as loading the release in fp16 does), same seed and
layout, and records the depth difference; then SAM2 (hiera-large, bf16) on 9 boxes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from gpucheck_rows import first_line, float32_settings, is_fatal_cuda_error

# (label, profile, overrides, cap GB, instances), most valuable first: the goals are written for 9 instances.
RESIDENT = {"transformer.offload": "none", "t5.offload": "none"}
RENDER_ROWS: tuple[tuple[str, str, dict[str, str], int | None, int], ...] = (
    ("12gb-n9", "12gb", {}, 12, 9),
    ("resident-n9", "12gb", RESIDENT, None, 9),
    ("8gb-n9", "8gb", {}, 8, 9),
    ("16gb-n9", "16gb", {}, 16, 9),
    ("12gb-n4", "12gb", {}, 12, 4),
    ("resident-n4", "12gb", RESIDENT, None, 4),
    ("8gb-n4", "8gb", {}, 8, 4),
    ("16gb-n4", "16gb", {}, 16, 4),
)
DRY_ROWS = ("12gb-n9", "resident-n9", "8gb-n9")  # a dry run: the rows the goals read, at 64x64


def renders(ctx: Any) -> None:
    """Part 5: one row per (profile, instances) that fits the time left."""
    import pipeline
    from threedis.engine.tiny import tiny_flux_path

    cuda = ctx.device.type == "cuda"
    size, steps, chunk = (1024, 4, 200) if cuda else (64, 1, 8)
    configs = None if cuda else str(tiny_flux_path())  # CPU: the tiny checkpoint's configs, random weights
    row_s = 90.0 if cuda else 15.0  # the first row (the part's estimate): build and quantize, a cold and a warm render
    for label, name, overrides, cap, instances in RENDER_ROWS:
        if not cuda and label not in DRY_ROWS:
            ctx.rows.not_measured("render", f"dry run: only {', '.join(DRY_ROWS)}", label=label)
            continue
        if not ctx.clock.fits(row_s):
            ctx.rows.not_measured("render", f"budget: {ctx.clock.left():.0f} s left, a row takes ~{row_s:.0f} s",
                                  label=label, profile=name, instances=instances, vram_cap_gb=cap)
            continue
        args = argparse.Namespace(random_real=True, configs=configs, model=None, overrides=dict(overrides),
                                  steps=steps, chunk=chunk, vram_cap_gb=cap if cuda else None, backend="auto",
                                  verbose=True, images=None)
        start = time.time()
        try:
            row = pipeline.run_row(args, pipeline._profile(name, overrides), size, size, instances, ctx.device)
        except Exception as exc:  # noqa: BLE001 - run_row keeps render failures; anything else is a row too
            ctx.rows.emit("render", "error", label=label, profile=name, instances=instances, vram_cap_gb=cap,
                          error=first_line(exc))
            if is_fatal_cuda_error(exc):
                raise
            continue
        finally:
            pipeline._release(ctx.device)
        render_status = row.pop("status")
        ctx.rows.emit("render", "ok" if render_status == "ok" else "failed", label=label, render_status=render_status,
                      cap_applied=cap is not None and cuda, wall_s=round(time.time() - start, 1), **row)
        pipeline.print_table([{**row, "status": f"{label}: {render_status}"}])
        row_s = max(row_s / 3, time.time() - start)


# -- part 6 ---------------------------------------------------------------------------------------

def _configs(cuda: bool) -> dict[str, dict[str, Any]]:
    """Model configs: the real ones (bundled) on CUDA, the tiny checkpoints' on a CPU dry run."""
    from threedis.engine.planner import load_config

    if cuda:
        return {k: load_config(v) for k, v in (("unet", "ldm3d_4c_unet"), ("vae", "ldm3d_4c_vae"),
                                                ("text", "ldm3d_4c_text"), ("sam2", "sam2_hiera_large"))}
    from threedis.engine.tiny.ldm3d import tiny_ldm3d_path
    from threedis.engine.tiny.sam2 import tiny_sam2_path

    ldm3d, sam = tiny_ldm3d_path(), tiny_sam2_path()
    return {"unet": load_config(ldm3d / "unet"), "vae": load_config(ldm3d / "vae"),
            "text": load_config(ldm3d / "text_encoder"), "sam2": load_config(sam), "sam2_dir": {"path": str(sam)}}


def _random(torch: Any, cfg: dict[str, Any], what: str, dtype: Any, device: Any, seed: int) -> Any:
    import pipeline
    from threedis.engine.planner import instantiate_meta

    return pipeline.materialize_random(instantiate_meta(cfg, what), dtype, device, seed=seed, what=what)


def _peaks(torch: Any, device: Any) -> dict[str, Any]:
    if device.type != "cuda":
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)}


def _sync(torch: Any, device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _weights_gb(*modules: Any) -> float:
    """GiB of the modules' parameters, each counted once (the adapters are also the UNet's submodules)."""
    params = {id(p): p for m in modules for p in m.parameters()}
    return round(sum(p.numel() * p.element_size() for p in params.values()) / 2**30, 3)


def _generate(torch: Any, pipe: Any, layout: Any, size: int, steps: int, migc: int) -> tuple[Any, dict[str, Any]]:
    """One stage-1 run, timed per step (synchronised, so each step's time is its GPU time)."""
    import statistics

    import numpy as np

    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(pipe.device)
    marks: list[float] = []

    def step(done: int, total: int) -> None:
        _sync(torch, pipe.device)
        marks.append(time.perf_counter())

    _sync(torch, pipe.device)
    start = time.perf_counter()
    result = pipe.generate(layout.prompt, [i.prompt for i in layout.instances], layout.boxes, width=size,
                           height=size, steps=steps, migc_steps=migc, seed=7, on_step=step)
    _sync(torch, pipe.device)
    wall = time.perf_counter() - start
    per_step = [b - a for a, b in zip([start, *marks[:-1]], marks)]
    with_adapter, without = per_step[:migc], per_step[migc:]
    return result, {"wall_s": round(wall, 3), "steps": steps, "migc_steps": migc,
                    "s_per_step_p50": round(statistics.median(per_step), 4),
                    "s_per_step_adapter_p50": round(statistics.median(with_adapter), 4) if with_adapter else None,
                    "s_per_step_plain_p50": round(statistics.median(without), 4) if without else None,
                    "depth_finite": bool(np.isfinite(result.depth_array).all()), **_peaks(torch, pipe.device)}


def _stage1(ctx: Any, torch: Any, cfgs: dict[str, Any], layout: Any, size: int, steps: int, migc: int) -> None:
    """fp32 run, then the same weights rounded to the profiles' fp16 (VAE kept fp32), then their difference."""
    import numpy as np
    import pipeline
    from threedis.engine.stage1.pipeline import Stage1Pipeline
    from threedis.engine.stage1.processors import install_processors, make_adapters
    from threedis.engine.tiny.ldm3d import TINY_LDM3D

    device, fp32 = ctx.device, torch.float32
    with torch.no_grad():
        unet = _random(torch, cfgs["unet"], "stage 1 unet", fp32, device, 1)
        vae = _random(torch, cfgs["vae"], "stage 1 vae", fp32, device, 2)
        text = _random(torch, cfgs["text"], "stage 1 text encoder", fp32, device, 3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            adapters = make_adapters(unet)  # the release's layers and widths, PyTorch's default init
        for adapter in adapters.values():
            adapter.gamma.fill_(0.5)  # the init value 0 would switch the adapter's output off
        procs = install_processors(unet, adapters)
        for proc in procs.values():
            proc.to(device=device, dtype=fp32)
    tokenizer = pipeline.StandInTokenizer(text.config.vocab_size, text.config.max_position_embeddings)
    scheduler = dict(TINY_LDM3D["scheduler"])  # LDM3D-4c's own scheduler settings (SD-1.x betas)
    common = {"size": size, "instances": len(layout.instances), "weights": "random real-size" if
              device.type == "cuda" else "random, tiny configs"}
    pipe32 = Stage1Pipeline(unet, vae, text, tokenizer, scheduler, True, device, fp32)
    ref, ref_timing = _generate(torch, pipe32, layout, size, steps, migc)
    ctx.rows.emit("stage1 fp32", "ok" if ref_timing["depth_finite"] else "failed", **common, **ref_timing,
                  formats="unet, adapter, text encoder and VAE fp32 (the authors')", precision=float32_settings(),
                  weights_gb=_weights_gb(unet, vae, text, *procs.values()))
    with torch.no_grad():
        unet.to(torch.float16)
        text.to(torch.float16)
        for proc in procs.values():
            proc.to(torch.float16)
    pipe16 = Stage1Pipeline(unet, vae, text, tokenizer, scheduler, True, device, torch.float16)
    half, timing = _generate(torch, pipe16, layout, size, steps, migc)
    ctx.rows.emit("stage1 fp16", "ok" if timing["depth_finite"] else "failed", **common, **timing,
                  formats="unet, adapter, text encoder fp16, VAE fp32 (the profiles' defaults)",
                  weights_gb=_weights_gb(unet, vae, text, *procs.values()))
    diff = np.abs(half.depth_array.astype(np.float64) - ref.depth_array.astype(np.float64))
    levels = np.abs(np.asarray(half.depth, dtype=np.int16) - np.asarray(ref.depth, dtype=np.int16))
    rgb = np.abs(np.asarray(half.rgb, dtype=np.int16) - np.asarray(ref.rgb, dtype=np.int16))
    print(f"  stage 1 at {size}^2: fp32 {ref_timing['wall_s']} s, fp16 {timing['wall_s']} s; depth |fp16 - fp32| "
          f"mean {diff.mean():.4f}, max {diff.max():.4f}", flush=True)
    both_finite = timing["depth_finite"] and ref_timing["depth_finite"]  # else the difference is NaN, not a finding
    ctx.rows.emit("stage1 fp16 vs fp32", "ok" if both_finite else "failed", **common, seed=7, steps=steps, migc_steps=migc,
                  depth_mean_abs=float(diff.mean()), depth_max_abs=float(diff.max()),
                  depth_p99_abs=float(np.percentile(diff, 99)), depth_levels_max=int(levels.max()),
                  depth_levels_over1_fraction=float((levels > 1).mean()), rgb_levels_mean=float(rgb.mean()),
                  note="same random weights (fp16 = the fp32 ones rounded), seed and layout; depth in [0, 1]")
    del pipe32, pipe16, unet, vae, text, procs, adapters


def _sam2(ctx: Any, torch: Any, cfgs: dict[str, Any], layout: Any) -> None:
    """SAM2 on the layout's boxes over a depth ramp: a cold and a warm call, each timed with its peak."""
    import pipeline
    from threedis.engine.sam_masks import SamMasker, SamPreprocess, enhance_regions

    device = ctx.device
    dtype = torch.bfloat16  # the profiles' sam2 format
    model = _random(torch, cfgs["sam2"], "sam2", dtype, device, 5)
    prep = SamPreprocess.from_file(Path(cfgs["sam2_dir"]["path"]) / "preprocessor_config.json") \
        if "sam2_dir" in cfgs else SamPreprocess()
    masker = SamMasker(model=model, prep=prep, device=device, dtype=dtype)
    depth = pipeline.depth_ramp(layout.width, layout.height)
    calls = []
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(torch, device)
        start = time.perf_counter()
        masks = enhance_regions(layout, depth, masker)
        _sync(torch, device)
        calls.append({"wall_s": round(time.perf_counter() - start, 3), **_peaks(torch, device)})
    print(f"  SAM2 on {len(layout.instances)} boxes: cold {calls[0]['wall_s']} s, warm {calls[1]['wall_s']} s",
          flush=True)
    ctx.rows.emit("sam2", input_px=f"{prep.width}x{prep.height}", image=f"{layout.width}x{layout.height}",
                  boxes=len(layout.instances), dtype="bfloat16", masks_found=sum(m is not None for m in masks),
                  cold=calls[0], warm=calls[1], weights_gb=_weights_gb(model),
                  weights="random real-size" if device.type == "cuda" else "random, tiny config")


def stage1_sam2(ctx: Any) -> None:
    """Part 6: stage 1 (fp32 and fp16, their depth difference), then SAM2; each when its estimate fits."""
    import pipeline
    import torch

    cuda = ctx.device.type == "cuda"
    cfgs = _configs(cuda)
    size, steps, migc = (512, 30, 16) if cuda else (64, 2, 1)
    side = 1024 if cuda else 64
    layout = pipeline.grid_layout(side, side, 9)
    for what, seconds, run in (("stage1", 40.0 if cuda else 5.0, lambda: _stage1(ctx, torch, cfgs, layout, size,
                                                                                    steps, migc)),
                               ("sam2", 20.0 if cuda else 3.0, lambda: _sam2(ctx, torch, cfgs, layout))):
        if not ctx.clock.fits(seconds):
            ctx.rows.not_measured(what, f"budget: {ctx.clock.left():.0f} s left, it takes ~{seconds:.0f} s")
            continue
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - out of memory or a failing path: a row, then the next
            ctx.rows.emit(what, "error", error=first_line(exc))
            if is_fatal_cuda_error(exc):
                raise
        finally:
            pipeline._release(ctx.device)
