"""Whole-pipeline benchmark per memory profile: peak VRAM, seconds per step, load and quantize time.

Each row renders one layout (N instances in a grid of boxes over a depth ramp) twice
with a fresh engine and a fresh cache folder: the cold render loads (and quantizes)
every model, the warm render gives the per-step time and the steady peak memory.

Modes:
  default        a checkpoint folder (--model; default: the tiny test checkpoint) with
                 each profile. On a CPU-only machine every GPU placement runs on the
                 CPU (the runtime's bookkeeping still follows the profile) and
                 bitsandbytes formats use their CPU kernels: useful for overheads and
                 to exercise every profile, not for GPU numbers.
  --random-real  no checkpoint: FLUX.1-Depth-dev, T5-XXL, CLIP-L and the VAE built from
                 the bundled configs (threedis.engine.configs) on the meta device, given
                 random weights in the profile's float dtype and quantized in memory per
                 profile; prompts go through a stand-in tokenizer. On CUDA each model is
                 built and quantized on the GPU (seconds; bitsandbytes NF4 of the 12B
                 transformer takes tens of minutes on a CPU), then moved to host RAM before
                 the row's engine places it (needs ~30 GB of free VRAM while building, and
                 ~35 GB of host RAM). There is no checkpoint to reload from, so
                 gpu-then-freed models park in host RAM instead of being freed (VRAM is the
                 same). --vram-cap-gb 12 caps this process's CUDA memory
                 (torch.cuda.set_per_process_memory_fraction) from engine creation on, to
                 imitate a 12 GB card: the allocator gets 12 GB minus what the process
                 holds outside it (CUDA context, library handles), measured first.

Rows go to bench/results/pipeline-<mode>.jsonl (one JSON object a line, overwritten per
run) and are printed as a table. Columns: s/step p20/p50/p80 (warm render), load and
quantize seconds (cold render), peak VRAM allocated / reserved (warm, GB = 2**30 B),
the planner's predicted peak, and plan/meas: the planned peak over the measured device
peak (largest reserved of both renders + what the process held outside PyTorch's
allocator, the larger of the row's start and end: CUDA context, cuBLAS), the number for
the planner's 10% goal; steps the step cache reused (s_per_computed_step leaves them
out). --images DIR saves each row's warm image (compare step-cache kinds by eye or by
pixel difference).

Usage:
  python bench/pipeline.py                                   # tiny checkpoint, all profiles, CPU or CUDA
  python bench/pipeline.py --profiles cpu --set step_cache=none
  python bench/pipeline.py --random-real --profiles 12gb,16gb --sizes 1024x1024 --instances 4,9 \\
      --steps 20 --vram-cap-gb 12
  python bench/pipeline.py --random-real --profiles 12gb --set transformer.offload=none --tag no-offload
                                                             # s/step baseline for the 1.25x goal
  python bench/pipeline.py --profiles cpu --set step_cache=none --images /tmp/sc   # vs step_cache=first-block
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from threedis.engine.api import RenderOptions
from threedis.engine.errors import UserError
from threedis.engine.profiles import GIB, Profile, apply_overrides, list_profiles, load_profile
from threedis.kernels.bench_attention import versions as base_versions

RUNTIME_MODELS = ("transformer", "t5", "clip", "vae")
REAL_CONFIGS = {"transformer": "flux_depth_transformer", "t5": "t5_xxl_encoder", "clip": "clip_l_text",
                "vae": "flux_vae"}
SUBFOLDERS = {"transformer": "transformer", "t5": "text_encoder_2", "clip": "text_encoder", "vae": "vae"}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = base_versions()
    for package in ("diffusers", "transformers", "bitsandbytes", "optimum-quanto", "accelerate"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = "missing"
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


# -- inputs ------------------------------------------------------------------------------------

def grid_layout(width: int, height: int, instances: int) -> Any:
    """N boxes in a near-square grid, slightly overlapping: the masked path with real overlaps."""
    from threedis.engine.layout import Instance, Layout

    cols = max(1, round(instances ** 0.5 + 0.49))
    rows = max(1, -(-instances // cols))
    boxes = []
    for i in range(instances):
        r, c = divmod(i, cols)
        x0, y0 = c / cols, r / rows
        boxes.append(Instance(f"object number {i} with a detailed description",
                              (x0, y0, min(1.0, x0 + 1.15 / cols), min(1.0, y0 + 1.15 / rows))))
    return Layout("a cluttered room in warm light", width, height, tuple(boxes))


def depth_ramp(width: int, height: int) -> Any:
    from PIL import Image

    return Image.linear_gradient("L").rotate(90).resize((width, height)).convert("RGB")


# -- random real-size models -------------------------------------------------------------------

class StandInTokenizer:
    """Hashes words to ids: what the encoders need to run without the real tokenizer files."""

    def __init__(self, vocab: int, max_length: int) -> None:
        self.vocab, self.model_max_length = vocab, max_length

    def __call__(self, prompts: list[str], max_length: int | None = None, **_: Any) -> Any:
        from types import SimpleNamespace

        length = max_length or self.model_max_length
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            words = prompt.split()[: length - 1]
            for col, word in enumerate(words):
                ids[row, col] = 2 + int(hashlib.sha256(word.encode()).hexdigest(), 16) % (self.vocab - 2)
            ids[row, len(words)] = 1  # EOS
            mask[row, : len(words) + 1] = 1
        return SimpleNamespace(input_ids=ids, attention_mask=mask)


def _config(key: str, configs: str | None) -> dict[str, Any]:
    from threedis.engine.planner import load_config

    if configs is None:
        return load_config(REAL_CONFIGS[key])
    return load_config(Path(configs) / SUBFOLDERS[key])


@torch.no_grad()
def materialize_random(model: Any, dtype: torch.dtype, device: torch.device, seed: int = 0, what: str = "model") -> Any:
    """Give a model built on the meta device random weights on `device`, in `dtype`; returns it in eval mode.

    Parameters are created one by one in the target dtype (no float32 copy of the whole model):
    matrices and kernels N(0, 0.02), vectors ones (weights: norms stay identities) or zeros
    (biases). Tied parameters (T5's shared / embed_tokens) stay tied. Buffers get the rule of
    their name; an unknown buffer is an error rather than a silent garbage value.
    """
    from torch import nn

    gen = torch.Generator(device=device).manual_seed(seed)
    made_for: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made_for:
                if p.dim() >= 2:
                    value = torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
                else:
                    value = (torch.ones if name == "weight" else torch.zeros)(p.shape, dtype=dtype, device=device)
                made_for[id(p)] = nn.Parameter(value, requires_grad=False)
            module._parameters[name] = made_for[id(p)]
        for name, b in list(module._buffers.items()):
            if b is None:
                continue
            if name == "position_ids":  # CLIP: arange over positions
                module._buffers[name] = torch.arange(b.shape[-1], device=device).expand(b.shape).contiguous()
            elif name == "positional_embedding":  # SAM2's random Fourier features: N(0, 1), as at init
                module._buffers[name] = torch.empty(b.shape, dtype=dtype, device=device).normal_(generator=gen)
            else:
                raise RuntimeError(f"{what}: buffer {name} has no random-init rule")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def random_model(key: str, configs: str | None, weights: str, device: torch.device) -> tuple[Any, float, float]:
    """(model with random weights in the profile's format, on the host; materialise s, quantize s).

    Weights as `materialize_random` gives them. On CUDA they are drawn and quantized on the GPU, then the model moves to
    the host; quanto formats are always quantized on the host (on CUDA quanto may repack
    weights into kernel-specific layouts).
    """
    from threedis.engine.offload import move_model
    from threedis.engine.planner import instantiate_meta
    from threedis.engine.quantize import PLAIN_SCHEMES, apply_quantization

    build = device if device.type == "cuda" and not weights.startswith("quanto-") else torch.device("cpu")
    start = time.perf_counter()
    model = materialize_random(instantiate_meta(_config(key, configs), key), PLAIN_SCHEMES.get(weights, torch.bfloat16),
                               build, what=key)
    _sync(build)
    made = time.perf_counter() - start
    start = time.perf_counter()
    if weights not in PLAIN_SCHEMES:
        apply_quantization(model, weights)
    move_model(model, "cpu")
    _sync(build)
    quantized = time.perf_counter() - start
    _release(device)
    return model, made, quantized


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Collect cycles (hooks keep models alive through closures) and hand cached VRAM back."""
    from threedis.engine.offload import release_memory

    release_memory(device)


def random_components(profile: Profile, configs: str | None, device: torch.device) -> tuple[Any, float, float]:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from threedis.engine.loading import FluxComponents, TextEncoders
    from threedis.engine.tiny import TINY_FLUX

    made = quantized = 0.0
    models = {}
    for key in RUNTIME_MODELS:
        models[key], m, q = random_model(key, configs, profile.policy(key).weights.value, device)
        made, quantized = made + m, quantized + q
    text = TextEncoders(clip=models["clip"], clip_tokenizer=StandInTokenizer(models["clip"].config.vocab_size, 77),
                        t5=models["t5"], t5_tokenizer=StandInTokenizer(models["t5"].config.vocab_size, 512))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(TINY_FLUX["scheduler"]))  # FLUX's own settings
    return FluxComponents(models["transformer"], models["vae"], scheduler, text=text), made, quantized


# -- one row ------------------------------------------------------------------------------------

CAP_METHOD = ("torch.cuda.set_per_process_memory_fraction: PyTorch's caching allocator may reserve at most the cap "
              "minus what this process holds outside it (CUDA context, library handles; outside_allocator_gb), so "
              "reserved + outside stays within the cap, as on a card of that size with nothing else on it")


def set_cap(device: torch.device, cap_gb: float | None, outside: int = 0) -> int | None:
    """Cap this process's CUDA memory at cap_gb GB (2**30 B) like a smaller card; None lifts it.

    `outside`: bytes the process holds outside PyTorch's allocator; the allocator gets the rest
    (CAP_METHOD). Returns the allocator's limit in bytes (None: no cap, or not CUDA).
    """
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gb is None:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        return None
    limit = max(0, min(total, int(cap_gb * GIB) - outside))
    torch.cuda.set_per_process_memory_fraction(limit / total, device)
    return limit


def outside_allocator(device: torch.device) -> int:
    """Device memory in use outside this process's caching allocator (its CUDA context, library handles,
    and any other process on the card)."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device))


def warm_cuda_libraries(device: torch.device) -> None:
    """Create cuBLAS(Lt), cuDNN and SDPA state once, so their memory outside the allocator is there before a
    row measures it (else it appears mid-render, past the cap)."""
    if device.type != "cuda":
        return
    a = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    (a @ a).float().sum().item()
    image = torch.randn(1, 8, 32, 32, device=device, dtype=torch.bfloat16)
    torch.nn.functional.conv2d(image, torch.randn(8, 8, 3, 3, device=device, dtype=torch.bfloat16)).sum().item()
    q = torch.randn(1, 2, 64, 64, device=device, dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item()
    del a, image, q
    _release(device)


def _bigger(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _gb(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p20": None, "p50": None, "p80": None}
    if len(values) == 1:
        return {"p20": values[0], "p50": values[0], "p80": values[0]}
    q = statistics.quantiles(values, n=10, method="inclusive")
    return {"p20": q[1], "p50": statistics.median(values), "p80": q[7]}


def _peaks(report: Any) -> tuple[int | None, int | None, int | None]:
    alloc = [s.peak_allocated for s in report.stages if s.peak_allocated is not None]
    res = [s.peak_reserved for s in report.stages if s.peak_reserved is not None]
    rss = [s.rss_peak for s in report.stages if s.rss_peak is not None]
    return (max(alloc) if alloc else None), (max(res) if res else None), (max(rss) if rss else None)


def run_row(args: argparse.Namespace, profile: Profile, width: int, height: int, instances: int,
            device: torch.device) -> dict[str, Any]:
    from threedis.engine.api import Engine

    row: dict[str, Any] = {
        "bench": "pipeline", "mode": "random-real" if args.random_real else "checkpoint",
        "model": "random " + (args.configs or "real configs") if args.random_real else str(args.model),
        "profile": profile.name, "overrides": args.overrides, "width": width, "height": height,
        "instances": instances, "steps": args.steps, "chunk": args.chunk, "device": str(device),
        "device_name": device_name(device), "vram_cap_gb": args.vram_cap_gb, "versions": versions(),
    }
    layout, depth = grid_layout(width, height, instances), depth_ramp(width, height)
    kwargs = dict(depth=depth, steps=args.steps, seed=0, options=RenderOptions(chunk=args.chunk))
    outside = 0  # device memory this process holds outside PyTorch's allocator (CUDA context, cuBLAS)
    plan = None
    if args.random_real:  # the planner prices the configs the models come from; beside failed rows too
        from threedis.engine.planner import plan as make_plan

        models = None if args.configs is None else {k: Path(args.configs) / SUBFOLDERS[k] for k in RUNTIME_MODELS}
        plan = make_plan(profile, width, height, instances, args.chunk, models)
        row.update(planned_peak_gpu_gb=_gb(plan.peak_gpu_bytes), planned_peak_stage=plan.peak_stage)
    with tempfile.TemporaryDirectory(prefix="threedis-bench-") as cache:
        try:
            _release(device)  # the previous row's models are gone before this row measures
            set_cap(device, None)  # building random models may need more than the cap
            made = quantized = 0.0
            components = None
            if args.random_real:
                components, made, quantized = random_components(profile, args.configs, device)
            if device.type == "cuda":
                warm_cuda_libraries(device)
                outside = outside_allocator(device)
                row["allocator_limit_gb"] = _gb(set_cap(device, args.vram_cap_gb, outside))
                torch.cuda.reset_peak_memory_stats(device)
            if components is not None:
                engine = Engine.from_components(components, profile=profile, device=device, cache_dir=cache,
                                                backend=args.backend)
                del components
            else:
                engine = Engine.from_pretrained(args.model, profile=profile, device=device, cache_dir=cache,
                                                backend=args.backend)
            cold = engine.render(layout, **kwargs)
            warm = engine.render(layout, **kwargs)
        except (UserError, RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError) as exc:
            row["status"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            row["outside_allocator_gb"] = _gb(outside)
            if args.verbose:
                traceback.print_exc()
            return row
        finally:
            outside_end = outside_allocator(device) if device.type == "cuda" else 0
            set_cap(device, None)
    steps = [s.wall_s for s in warm.report.stages if s.name == "step"]
    loads = [s.wall_s for s in cold.report.stages if s.name.startswith("load ")]
    quants = [s.wall_s for s in cold.report.stages if s.name.startswith("quantize ")]
    alloc, reserved, rss = _peaks(warm.report)
    cold_alloc, cold_reserved, _ = _peaks(cold.report)
    if plan is None:
        plan = engine.models.plan(width, height, instances, args.chunk)
    cache = warm.settings["step_cache"]
    computed = [s.wall_s for s in warm.report.stages
                if s.name == "step" and s.info.get("step") not in set(cache["reused_steps"])]
    measured = None
    if _bigger(reserved, cold_reserved) is not None:
        measured = _bigger(reserved, cold_reserved) + max(outside, outside_end)
    if args.images is not None:
        args.images.mkdir(parents=True, exist_ok=True)
        tag = "-".join(f"{k}={v}" for k, v in sorted(args.overrides.items())).replace("/", "_")
        warm.image.save(args.images / f"{profile.name}-{width}x{height}-n{instances}{'-' + tag if tag else ''}.png")
    row.update({
        "status": "ok",
        "s_per_step": _pcts(steps), "s_per_computed_step": _pcts(computed),
        "load_s": round(sum(loads) + made, 4), "quantize_s": round(sum(quants) + quantized, 4),
        "peak_allocated_gb": _gb(alloc), "peak_reserved_gb": _gb(reserved), "peak_rss_gb": _gb(rss),
        "cold_peak_allocated_gb": _gb(cold_alloc), "cold_peak_reserved_gb": _gb(cold_reserved),
        "planned_peak_gpu_gb": _gb(plan.peak_gpu_bytes), "planned_peak_stage": plan.peak_stage,
        "measured_peak_device_gb": _gb(measured), "outside_allocator_gb": _gb(outside),
        "outside_allocator_end_gb": _gb(outside_end),
        "vram_cap_method": CAP_METHOD if args.vram_cap_gb is not None and device.type == "cuda" else None,
        "plan_vs_measured": None if not measured else round(plan.peak_gpu_bytes / measured, 4),
        "backend": warm.settings["backend"],
        "weights": {k: v["weights"] for k, v in warm.settings["placement"].items()},
        "step_cache": cache["kind"], "reused_steps": len(cache["reused_steps"]),
        "report": {"stages": [{"name": s.name, "wall_s": s.wall_s} for s in warm.report.stages
                              if s.name != "step"]},
    })
    return row


# -- table and main ----------------------------------------------------------------------------

def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'profile':<8} {'size':>9} {'N':>2} {'s/step p50':>10} {'p20-p80':>15} {'load s':>7} {'quant s':>7} "
          f"{'alloc GB':>8} {'resv GB':>8} {'plan GB':>7} {'plan/meas':>9} {'reused':>6}  status")
    for r in rows:
        s = r.get("s_per_step") or {}
        spread = f"{_fmt(s.get('p20'))}-{_fmt(s.get('p80'))}" if s else "-"
        print(f"{r['profile']:<8} {r['width']:>4}x{r['height']:<4} {r['instances']:>2} {_fmt(s.get('p50'), '.4f'):>10} "
              f"{spread:>15} {_fmt(r.get('load_s'), '.2f'):>7} {_fmt(r.get('quantize_s'), '.2f'):>7} "
              f"{_fmt(r.get('peak_allocated_gb'), '.2f'):>8} {_fmt(r.get('peak_reserved_gb'), '.2f'):>8} "
              f"{_fmt(r.get('planned_peak_gpu_gb'), '.2f'):>7} {_fmt(r.get('plan_vs_measured'), '.3f'):>9} "
              f"{r.get('reused_steps', '-')!s:>6}  {r['status']}")


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        w, _, h = item.lower().partition("x")
        out.append((int(w), int(h or w)))
    return out


def _profile(name: str, overrides: dict[str, str]) -> Profile:
    """A built-in profile as data: on a CPU engine its GPU placements run on the CPU."""
    return apply_overrides(load_profile(name), overrides or None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the tiny test checkpoint)")
    parser.add_argument("--random-real", action="store_true", help="real-size models with random weights")
    parser.add_argument("--configs", default=None,
                        help="with --random-real: a checkpoint folder whose configs to use (default: the real ones)")
    parser.add_argument("--profiles", default=",".join(list_profiles()))
    parser.add_argument("--sizes", default=None, help="WxH list (default 64x64,128x128; random-real 1024x1024)")
    parser.add_argument("--instances", default=None, help="list (default 0,2; random-real 4,9)")
    parser.add_argument("--steps", type=int, default=None, help="default 6; random-real 20")
    parser.add_argument("--chunk", type=int, default=None, help="T5 tokens per prompt (default 16; random-real 200)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--vram-cap-gb", type=float, default=None, help="cap this process's CUDA memory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="profile override for every row, e.g. step_cache=none")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    parser.add_argument("--images", type=Path, default=None, help="save each row's warm image in this folder")
    args = parser.parse_args(argv)

    from threedis.engine.profiles import parse_overrides

    real = args.random_real and args.configs is None
    args.sizes = _sizes(args.sizes or ("1024x1024" if real else "64x64,128x128"))
    args.instances = [int(n) for n in (args.instances or ("4,9" if real else "0,2")).split(",")]
    args.steps = args.steps or (20 if real else 6)
    args.chunk = args.chunk or (200 if real else 16)
    overrides = parse_overrides(args.overrides)
    args.overrides = overrides
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model is None and not args.random_real:
        from threedis.engine.tiny import tiny_flux_path

        args.model = tiny_flux_path()
    if args.vram_cap_gb is not None and device.type != "cuda":
        print("--vram-cap-gb needs CUDA", file=sys.stderr)
        return 2

    rows = []
    for name in args.profiles.split(","):
        profile = _profile(name.strip(), overrides)
        if device.type == "cpu" and any(p.weights.needs_cuda for p in profile.models.values()):
            print(f"note: {profile.name} uses bitsandbytes formats; running their CPU kernels")
        for width, height in args.sizes:
            for n in args.instances:
                row = run_row(args, profile, width, height, n, device)
                rows.append(row)
                print_table([row])
    mode = ("random-real" if args.random_real else "checkpoint") + f"-{device.type}"
    if args.vram_cap_gb is not None:
        mode += f"-cap{args.vram_cap_gb:g}gb"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pipeline-{mode}{('-' + args.tag) if args.tag else ''}.jsonl"
    path.write_text("".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows))
    print()
    print_table(rows)
    print(f"\nrows written to {path}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
