"""Attention benchmark: triton vs FlexAttention vs SDPA with a dense mask vs unmasked SDPA (flash).

One run measures every backend on the same inputs, so results are ratios taken
side by side on one CUDA device. A table is printed and the rows are written as
JSON lines (attention-<device>-<time>.jsonl) into --out (default: the current
folder), keyed by (backend, case, phase, dtype, device, versions).
On a CPU it runs the backends that exist there at small shapes, to check that
they run: CPU kernels are eager and unfused, so speed ratios and TFLOP/s are not
reported there (the Triton kernel runs on CPU only under TRITON_INTERPRET=1,
which is slow but exact).

Run: `threedis bench attention [--help]` or `python bench/attention.py`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from threedis.kernels import rule
from threedis.kernels.attention import masked_joint_attention, select_backend
from threedis.kernels.block_table import build_block_table, density

HEADS, HEAD_DIM = 24, 128  # FLUX.1


@dataclass(frozen=True)
class Case:
    """One benchmark shape: image size in pixels, instance count, T5 tokens per prompt."""

    name: str
    width: int
    height: int
    instances: int
    chunk: int = 200

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // 16, self.width // 16

    @property
    def length(self) -> int:
        h, w = self.grid
        return h * w + self.chunk * (self.instances + 1)


GPU_CASES = (
    Case("1024x1024-n2", 1024, 1024, 2),
    Case("1024x1024-n4", 1024, 1024, 4),
    Case("1024x1024-n9", 1024, 1024, 9),
    Case("768x1024-n4", 768, 1024, 4),
    Case("512x512-n2", 512, 512, 2),
)
CPU_CASES = (
    Case("256x256-n2", 256, 256, 2, chunk=32),
    Case("256x256-n4", 256, 256, 4, chunk=32),
)
PHASES = {"early": rule.Phases(True, True, True, True), "late": rule.Phases(False, True, True, True)}


def layout_boxes(n: int, seed: int = 0) -> list[tuple[float, float, float, float]]:
    """Deterministic, partly overlapping boxes: a loose grid of instances with jitter, like real scenes."""
    gen = torch.Generator().manual_seed(seed + n)
    cols = max(1, round(n**0.5))
    rows = -(-n // cols)
    boxes = []
    for i in range(n):
        r, c = divmod(i, cols)
        jitter = torch.rand(4, generator=gen).tolist()
        x0 = (c + 0.1 * jitter[0]) / cols - 0.05
        y0 = (r + 0.1 * jitter[1]) / rows - 0.05
        x1 = (c + 1 - 0.1 * jitter[2]) / cols + 0.08
        y1 = (r + 1 - 0.1 * jitter[3]) / rows + 0.08
        boxes.append((max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)))
    return boxes


def _quantiles_ms(times_s: Sequence[float]) -> tuple[float, float, float]:
    ordered = sorted(times_s)
    if len(ordered) == 1:
        return (ordered[0] * 1e3,) * 3
    q = statistics.quantiles(ordered, n=10, method="inclusive")
    return q[1] * 1e3, statistics.median(ordered) * 1e3, q[7] * 1e3


def time_calls(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Seconds per call after `warmup` calls: CUDA events around each call on a GPU, the host clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _extra_memory(fn: Callable[[], torch.Tensor], device: torch.device) -> int | None:
    """Peak bytes one cold call allocates beyond its inputs and output (mask / table builds included)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base - out.numel() * out.element_size())


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton  # optional: the kernel's backend; the bench runs without it

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "missing"
    try:
        out["threedis"] = metadata.version("threedis-flux")
    except Exception:  # noqa: BLE001 - running from a checkout without install
        out["threedis"] = "checkout"
    return out


def device_info(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": "cuda", "device_name": props.name, "vram_gb": f"{props.total_memory / 2**30:.1f}"}
    return {"device": "cpu", "device_name": platform.processor() or platform.machine(), "vram_gb": "0"}


def flex_tiles(device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    """FlexAttention's (BLOCK_M, BLOCK_N) for the comparison: the Triton kernel's tile, so both skip the same
    tiles, or 64x64 where the card's shared memory per block is too small for it (consumer cards,
    ~100 KB: Inductor's default 128x64 D=128 config fails to launch there)."""
    from threedis.kernels.triton_attention import choose_config  # imports triton, optional

    cfg = choose_config(device, dtype, HEAD_DIM)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smem = getattr(props, "shared_memory_per_block_optin", None)
        if smem is not None and smem < 160 * 1024:
            return 64, 64
    return cfg.block_m, cfg.block_n


def flex_runner(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: rule.TokenLayout, phases: rule.Phases,
                tiles: tuple[int, int], compiled: Callable | None) -> Callable[[], torch.Tensor]:
    """FlexAttention with the rule's mask_mod, a BlockMask of `tiles` and the same kernel tile (when compiled).

    The engine's flex backend uses 128x128 mask blocks and Inductor's default tile; for a like-for-like
    comparison with the Triton kernel the bench sets both. The BlockMask is built on the first call, so
    the cold call (extra memory) includes it, as the other backends' cold calls include their tables.
    """
    # FlexAttention needs torch >= 2.5 (and flex_backend imports it): only when flex is benchmarked
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from threedis.kernels.flex_backend import rule_mask_mod

    device, length = q.device, q.shape[1]
    state: dict = {}

    def fn() -> torch.Tensor:
        if "mask" not in state:
            pad = -length % max(*tiles, 128)  # mask_mod may be evaluated past L, up to whole tiles
            member = F.pad(tokens.member.to(device, torch.int64), (0, pad))
            kind = F.pad(tokens.kind.to(device, torch.int32), (0, pad))
            restrict = F.pad(rule.query_restrictions(tokens, phases).to(device, torch.int32), (0, pad))
            state["mask"] = create_block_mask(rule_mask_mod(member, kind, restrict), None, None, length, length,
                                              device=device, BLOCK_SIZE=tiles)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D] views
        if compiled is None:  # CPU: eager (unfused) FlexAttention, on purpose; silence the "compile it" advice
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
                return flex_attention(qt, kt, vt, block_mask=state["mask"])
        options = {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]}
        return compiled(qt, kt, vt, block_mask=state["mask"], kernel_options=options)

    return fn


def compile_flex(device: torch.device) -> Callable | None:
    """`torch.compile(flex_attention)` on CUDA (its fused kernel exists only compiled), None elsewhere."""
    if device.type != "cuda":
        return None
    from torch.nn.attention.flex_attention import flex_attention  # torch >= 2.5, only for flex

    return torch.compile(flex_attention, dynamic=False)  # one graph per shape, like a real render


def many_compiles() -> Any:
    """Dynamo config for a run where every (case, phase) is a new shape or mask: keep every compiled
    graph rather than fall back to eager at the default recompile limit."""
    dynamo_config = torch._dynamo.config
    limits = {"recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit": 256}
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        limits["accumulated_recompile_limit"] = 4096
    return dynamo_config.patch(**limits)


def run_case(case: Case, phase_name: str, backends: Sequence[str], dtype: torch.dtype, device: torch.device,
             warmup: int, reps: int, batch: int = 1, compiled_flex: Callable | None = None,
             heads: int = HEADS) -> list[dict]:
    """All requested backends on one (case, phase): same q/k/v, same permuted token order.

    compiled_flex: `torch.compile(flex_attention)` on CUDA (its fused kernel exists only compiled), else None.
    A backend that fails (out of memory, a compile error) gives a row with "error" instead of ending the run.
    """
    phases = PHASES[phase_name]
    h, w = case.grid
    regions = rule.box_regions(layout_boxes(case.instances), h, w)
    order = rule.membership_order(regions)
    raster = rule.TokenLayout.build(regions, chunk=case.chunk)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(batch, raster.length, heads, HEAD_DIM, generator=gen).to(device=device, dtype=dtype)
               for _ in range(3))  # [B, L, H, D]
    inputs = _CaseInputs(case, phase_name, phases, regions, order, raster, q, k, v, density(raster, phases))
    rows = []
    flash_ms = None
    for backend in backends:
        try:
            row = _measure(backend, inputs, warmup, reps, flash_ms, compiled_flex)
        except Exception as exc:  # noqa: BLE001 - one failing backend is a finding, not the end of the run
            if device.type == "cuda":
                torch.cuda.empty_cache()
            first = str(exc).splitlines()[0] if str(exc) else ""
            row = {"bench": "attention", "backend": backend, "case": case.name, "phase": phase_name,
                   "error": f"{type(exc).__name__}: {first}"[:500], "dtype": str(dtype).removeprefix("torch."),
                   **device_info(device), "versions": versions()}
        if backend == "flash" and "p50_ms" in row:
            flash_ms = row["p50_ms"]
        rows.append(row)
    return rows


@dataclass(frozen=True)
class _CaseInputs:
    """What every backend of one (case, phase) shares: the rule, the token orders, q/k/v [B, L, H, D]."""

    case: Case
    phase_name: str
    phases: rule.Phases
    regions: torch.Tensor
    order: torch.Tensor  # membership order of the image cells
    raster: rule.TokenLayout
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    density: float


def _measure(backend: str, inp: _CaseInputs, warmup: int, reps: int, flash_ms: float | None,
             compiled_flex: Callable | None) -> dict:
    """One backend's row: times, memory beyond q/k/v/out, tiles; a skipped row where it cannot run here."""
    q, k, v, case, phases = inp.q, inp.k, inp.v, inp.case, inp.phases
    batch, length, heads, _ = q.shape
    device, dtype = q.device, q.dtype
    # a fresh layout per backend: its cold call (extra memory) builds its own tables
    tokens = rule.TokenLayout.build(inp.regions, chunk=case.chunk, order=inp.order).to(device)
    tile_fraction = tile_fraction_raster = 1.0
    tiles = None
    if backend == "flash":
        def fn():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        reason = "unmasked SDPA (flash where the device has it)"
    else:
        available, reason = _backend_reason(backend, device, dtype)
        if not available:
            return _skipped_row(case, inp.phase_name, backend, dtype, device, reason)
        if backend in ("triton", "flex"):
            from threedis.kernels.triton_attention import choose_config  # imports triton, optional

            cfg = choose_config(device, dtype, HEAD_DIM)
            tiles = (cfg.block_m, cfg.block_n) if backend == "triton" else flex_tiles(device, dtype)
            tile_fraction = build_block_table(tokens, phases, *tiles).tile_fraction
            tile_fraction_raster = build_block_table(inp.raster, phases, *tiles).tile_fraction
        if backend == "flex":
            fn = flex_runner(q, k, v, tokens, phases, tiles, compiled_flex)
            reason += f"; {'compiled' if compiled_flex else 'eager'}, {tiles[0]}x{tiles[1]} tiles"
        else:
            def fn():
                return masked_joint_attention(q, k, v, tokens, phases, backend=backend)
    extra = _extra_memory(fn, device)
    times = time_calls(fn, device, warmup, reps)
    p20, p50, p80 = _quantiles_ms(times)
    if backend == "flash":
        flash_ms = p50
    flops = 4 * batch * heads * HEAD_DIM * length * length * tile_fraction
    speed = device.type == "cuda"  # eager CPU kernels: their speed says nothing about the GPU's
    return {
        "bench": "attention", "backend": backend, "case": case.name, "phase": inp.phase_name,
        "shape": {"B": batch, "L": length, "H": heads, "D": HEAD_DIM, "width": case.width,
                  "height": case.height, "instances": case.instances, "chunk": case.chunk},
        "dtype": str(dtype).removeprefix("torch."), **device_info(device), "versions": versions(),
        "p20_ms": p20, "p50_ms": p50, "p80_ms": p80, "reps": reps,
        "ratio_to_flash": None if flash_ms is None or not speed else p50 / flash_ms,
        "tflops_computed": flops / (p50 / 1e3) / 1e12 if speed else None,
        "extra_mem_bytes": extra, "tile_fraction": tile_fraction, "tiles": None if tiles is None else list(tiles),
        "tile_fraction_raster": tile_fraction_raster, "density": inp.density, "note": reason,
    }


_API_HINT = ". Use backend="  # select_backend's advice to Python callers; a bench user picks --backends


def _backend_reason(backend: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    try:
        name, reason = select_backend(device, dtype, requested=backend)
    except rule.RuleError as err:
        return False, str(err).split(_API_HINT)[0]
    return name == backend, reason


def _skipped_row(case: Case, phase: str, backend: str, dtype: torch.dtype, device: torch.device, reason: str) -> dict:
    return {"bench": "attention", "backend": backend, "case": case.name, "phase": phase, "skipped": reason,
            "dtype": str(dtype).removeprefix("torch."), **device_info(device), "versions": versions()}


def format_table(rows: Sequence[dict]) -> str:
    head = f"{'case':<14} {'phase':<6} {'backend':<8} {'p50 ms':>9} {'x flash':>8} {'TFLOP/s':>8} " \
           f"{'extra MB':>9} {'tile':>6} {'tiles':>6} {'raster':>6} {'density':>7}"
    lines = [head, "-" * len(head)]
    skipped: dict[tuple[str, str], int] = {}
    for r in rows:
        if "skipped" in r:
            key = (r["backend"], r["skipped"])
            skipped[key] = skipped.get(key, 0) + 1
            continue
        if "error" in r:
            lines.append(f"{r['case']:<14} {r['phase']:<6} {r['backend']:<8} failed: {r['error']}")
            continue
        ratio = "-" if r["ratio_to_flash"] is None else f"{r['ratio_to_flash']:.2f}"
        tflops = "-" if r["tflops_computed"] is None else f"{r['tflops_computed']:.2f}"
        extra = "-" if r["extra_mem_bytes"] is None else f"{r['extra_mem_bytes'] / 1e6:.2f}"
        tile = "-" if r.get("tiles") is None else "x".join(str(t) for t in r["tiles"])
        lines.append(
            f"{r['case']:<14} {r['phase']:<6} {r['backend']:<8} {r['p50_ms']:>9.3f} {ratio:>8} "
            f"{tflops:>8} {extra:>9} {tile:>6} {r['tile_fraction']:>6.1%} "
            f"{r['tile_fraction_raster']:>6.1%} {r['density']:>7.1%}"
        )
    for (backend, reason), count in skipped.items():  # once per backend, not once per row
        lines.append(f"skipped {backend} ({count} case{'s' if count > 1 else ''}): {reason}")
    if any(r.get("device") != "cuda" for r in rows):
        lines.append(CPU_NOTE)
    return "\n".join(lines)


CPU_NOTE = ("note: no CUDA device, so this run only checks that the backends run; CPU kernels are eager and "
            "unfused, so no speed ratios or TFLOP/s are shown (run it on a GPU for those)")


def write_rows(rows: Sequence[dict], out_dir: Path, device: torch.device) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = device_info(device)["device_name"].replace(" ", "-").replace("/", "-") or device.type
    path = out_dir / f"attention-{slug}-{stamp}.jsonl"
    suffix = 1
    while path.exists():  # never overwrite an earlier result
        path = out_dir / f"attention-{slug}-{stamp}-{suffix}.jsonl"
        suffix += 1
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="threedis bench attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to measure on (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--backends", default="flash,triton,flex,sdpa",
                        help="comma list among flash,triton,flex,sdpa (flash = unmasked SDPA, measured first)")
    parser.add_argument("--cases", default=None, help="comma list of case names (default: all for the device)")
    parser.add_argument("--phases", default="early,late", help="early = all four switches on; late = I2I off")
    parser.add_argument("--heads", type=int, default=HEADS,
                        help=f"attention heads (FLUX: {HEADS}; fewer for a quick run)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls per backend and case before timing (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed calls per backend and case: p20/p50/p80 over these (default 30 on CUDA, 3 on CPU)")
    parser.add_argument("--out", type=Path, default=Path("."),
                        help="folder for the JSON-lines results (default: the current folder; "
                             "`--out bench/results` in a checkout adds them to the committed results)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype or ("bf16" if cuda else "fp32")]
    all_cases = GPU_CASES if cuda else CPU_CASES
    known = {c.name: c for c in (*GPU_CASES, *CPU_CASES)}
    names = args.cases.split(",") if args.cases else [c.name for c in all_cases]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {sorted(known)}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if backends and "flash" in backends:
        backends.remove("flash")
        backends.insert(0, "flash")  # the ratio column needs it first
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    reps = args.reps if args.reps is not None else (30 if cuda else 3)

    compiled_flex = compile_flex(device) if "flex" in backends else None
    rows: list[dict] = []
    with many_compiles():
        for name in names:
            for phase in args.phases.split(","):
                rows.extend(run_case(known[name], phase, backends, dtype, device, warmup, reps,
                                     compiled_flex=compiled_flex, heads=args.heads))
    print(format_table(rows))
    if not args.no_write:
        print(f"\nrows written to {write_rows(rows, args.out, device)}")
    return 0
