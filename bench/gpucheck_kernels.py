"""GPU check parts 3 and 4: the attention kernels at the real shapes, right first, then fast.

Part 3 runs the Triton kernel and FlexAttention (the engine's own paths) at 1024x1024
with 2, 4 and 9 instances and 768x1024, in raster and membership token order, for all
15 non-empty phase sets, in bf16 and fp16, and compares each with a float32 reference
(SDPA's math kernel with the dense allowed matrix, on the same rounded inputs). A result
passes when it has no unwritten or NaN element (the Triton output is poisoned with NaN
first) and its largest error is at most twice PyTorch's own dense-mask SDPA error at the
input dtype plus a small floor (the flash-attention tests' rule). The block table is
checked against the dense matrix too: every tile holding an allowed pair visited, every
tile run without a mask fully allowed, and the exact density.
Part 4 is the attention benchmark (threedis.kernels.bench_attention) on the same shapes.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from gpucheck_rows import first_line, is_fatal_cuda_error

# Absolute floor per input dtype on top of 2x PyTorch's own error (tests/attention_helpers.py's).
_ATOL = {"float16": 2e-4, "bfloat16": 2e-3, "float32": 1e-6}
_GPU_CASES = ("1024x1024-n9", "1024x1024-n4", "1024x1024-n2", "768x1024-n4")  # the goals' shape first
_ORDERS = ("raster", "membership")


def phase_sets(cuda: bool = True) -> list[Any]:
    """The 15 phase sets a schedule can produce with attention masked (all four switches off is plain); a CPU
    run takes four of them (all on, I2I off, image-side only, text-side only): the interpreter is slow."""
    from threedis.kernels.rule import Phases

    every = [Phases(*bits) for bits in itertools.product((True, False), repeat=4) if any(bits)]
    return every if cuda else [every[0], every[8], every[3], every[12]]


def _phase_name(phases: Any) -> str:
    return ",".join(n for n in ("i2i", "i2t", "t2i", "t2t") if getattr(phases, n)) or "none"


def _cases(cuda: bool) -> list[Any]:
    from threedis.kernels.bench_attention import GPU_CASES, Case

    if cuda:
        known = {c.name: c for c in GPU_CASES}
        return [known[name] for name in _GPU_CASES]
    return [Case("64x64-n2", 64, 64, 2, chunk=8), Case("64x64-n9", 64, 64, 9, chunk=4)]


def _qkv(torch: Any, length: int, heads: int, dim: int, dtype: Any, device: Any, seed: int) -> tuple[Any, Any, Any]:
    """Fresh random q, k, v [1, L, H, D] as diffusers passes them: views of one packed projection."""
    gen = torch.Generator(device=device).manual_seed(seed)
    packed = torch.randn(1, length, 3, heads, dim, device=device, generator=gen).to(dtype)
    return packed[:, :, 0], packed[:, :, 1], packed[:, :, 2]


def _reference(torch: Any, q: Any, k: Any, v: Any, allowed: Any, dtype: Any) -> Any:
    """softmax(q k^T / sqrt(d) + mask) v in `dtype` with SDPA's math kernel (plain matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    with sdpa_kernel([SDPBackend.MATH]):
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed)
    return out.transpose(1, 2)  # [B, L, H, D]


def _errors(out: Any, ref: Any) -> dict[str, Any]:
    diff = (out.to(ref.dtype) - ref).abs()
    finite = diff.isfinite()
    nan = int((~finite).sum())
    worst = float(diff[finite].max()) if nan < diff.numel() else float("inf")
    rel = float((out.to(ref.dtype) - ref).nan_to_num(0).norm() / ref.norm())
    return {"max_abs_err": worst, "rel_err": rel, "nonfinite": nan}


def tile_check(torch: Any, allowed: Any, table: Any) -> dict[str, Any]:
    """The block table against the dense allowed matrix: sound (nothing allowed skipped, no mask-free tile
    with a forbidden pair) and exact (no tile visited without an allowed pair)."""
    length, bm, bn = allowed.shape[0], table.block_m, table.block_n
    nq, nk = -(-length // bm), -(-length // bn)
    padded = torch.nn.functional.pad(allowed, (0, nk * bn - length, 0, nq * bm - length))
    counts = padded.view(nq, bm, nk, bn).sum(dim=(1, 3))  # allowed pairs per tile
    rows_real = (length - torch.arange(nq, device=allowed.device) * bm).clamp(max=bm)
    cols_real = (length - torch.arange(nk, device=allowed.device) * bn).clamp(max=bn)
    any_allowed = counts > 0
    all_allowed = counts == rows_real[:, None] * cols_real[None, :]
    visit = torch.zeros(nq, nk, dtype=torch.bool, device=allowed.device)
    full = torch.zeros_like(visit)
    index, count, flags = table.kv_index.to(allowed.device), table.kv_count.to(allowed.device), table.kv_full
    real = torch.arange(index.shape[1], device=allowed.device)[None, :] < count[:, None].long()
    rows = torch.arange(nq, device=allowed.device)[:, None].expand_as(index)
    visit[rows[real], index[real].long()] = True
    full[rows[real], index[real].long()] = flags.to(allowed.device)[real] != 0
    return {"tiles_sound": bool((visit | ~any_allowed).all() and (all_allowed | ~full).all()),
            "tiles_exact": bool(torch.equal(visit, any_allowed)),
            "tile_fraction_dense": float(any_allowed.float().mean())}


def _check_one(ctx: Any, torch: Any, case: Any, order: str, tokens: Any, phases: Any, q: Any, k: Any, v: Any,
               ref_dtype: Any) -> None:
    """Both backends on one (case, dtype, order, phase set): one row each."""
    from threedis.kernels import triton_attention as ta
    from threedis.kernels.attention import attention_sparsity, masked_joint_attention
    from threedis.kernels.block_table import density
    from threedis.kernels.rule import dense_allowed

    dtype_name = str(q.dtype).removeprefix("torch.")
    allowed = dense_allowed(tokens, phases)  # [L, L] on the device: the reference only
    ref = _reference(torch, q, k, v, allowed, ref_dtype)
    plain = masked_joint_attention(q, k, v, tokens, phases, backend="sdpa")  # PyTorch at the input dtype
    plain_err = _errors(plain, ref)
    del plain
    bound = 2 * plain_err["max_abs_err"] + _ATOL[dtype_name]
    exact = density(tokens, phases)
    dense = float(allowed.double().mean())
    common = {"case": case.name, "L": tokens.length, "heads": q.shape[2], "head_dim": q.shape[3], "dtype": dtype_name,
              "order": order, "phases": _phase_name(phases), "reference": f"SDPA math in {ref_dtype}",
              "sdpa_max_abs_err": plain_err["max_abs_err"], "sdpa_rel_err": plain_err["rel_err"], "bound": bound,
              "density": exact, "density_dense": dense, "density_match": abs(exact - dense) < 0.5 / tokens.length**2}
    for backend in ("triton", "flex"):
        try:
            fields: dict[str, Any] = {}
            if backend == "triton":
                cfg = ta.choose_config(q.device, q.dtype, q.shape[-1])
                table = ta.tiles(tokens, phases, q.device, q.dtype)
                member = tokens.member.to(q.device, torch.int64).contiguous()
                kind = tokens.kind.to(q.device, torch.int8).contiguous()
                out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)  # unwritten stays NaN
                ta.launch(q, k, v, member, kind, table.kv_index, table.kv_count, table.kv_full,
                          *phases.restricted_kinds(), cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, out=out)
                engine = masked_joint_attention(q, k, v, tokens, phases, backend="triton")  # the custom op
                fields.update(tile_check(torch, allowed, table), tile_fraction=table.tile_fraction,
                              tiles=f"{cfg.block_m}x{cfg.block_n}", warps=cfg.num_warps, stages=cfg.num_stages,
                              engine_path_max_diff=float((engine.float() - out.float()).abs().nan_to_num(1e9).max()))
                del engine
            else:
                out = masked_joint_attention(q, k, v, tokens, phases, backend="flex")
                sparsity = attention_sparsity(tokens, phases, q.device, q.dtype, backend="flex")
                fields.update(tile_fraction=sparsity["tile_fraction"], tiles=sparsity.get("tile"))
            errors = _errors(out, ref)
            del out
            ok = (errors["nonfinite"] == 0 and errors["max_abs_err"] <= bound and common["density_match"]
                  and fields.get("tiles_sound", True))
            ctx.rows.emit("correctness", "ok" if ok else "failed", backend=backend, **common, **errors, **fields)
        except Exception as exc:  # noqa: BLE001 - a failing backend is a row; a dead CUDA context ends the part
            ctx.rows.emit("correctness", "error", backend=backend, **common, error=first_line(exc))
            if is_fatal_cuda_error(exc):
                raise
            if q.device.type == "cuda":
                torch.cuda.empty_cache()


def kernel_correctness(ctx: Any) -> None:
    """Part 3. Budget: each (case, dtype) group starts only when its estimate fits."""
    import torch
    from threedis.kernels.bench_attention import layout_boxes, many_compiles
    from threedis.kernels.rule import TokenLayout, box_regions, membership_order

    cuda = ctx.device.type == "cuda"
    heads, dim = (24, 128) if cuda else (2, 32)
    dtypes = (torch.bfloat16, torch.float16) if cuda else (torch.float32,)
    ref_dtype = torch.float32 if cuda else torch.float64  # a float32 kernel needs a finer reference
    if not cuda:
        for name in ("bfloat16", "float16"):
            ctx.rows.not_measured("correctness", "no CUDA device: Triton's CPU interpreter has no bfloat16 and CPU "
                                  "FlexAttention runs float32/float64 only; the CPU run checks float32", dtype=name)
    group_s = 25.0 if cuda else 2.0  # one (case, dtype): 2 orders x 15 phase sets, compiles included
    seed = 0
    with many_compiles():
        for case, dtype in itertools.product(_cases(cuda), dtypes):
            name = str(dtype).removeprefix("torch.")
            if not ctx.clock.fits(group_s):
                ctx.rows.not_measured("correctness", f"budget: {ctx.clock.left():.0f} s left, a group takes "
                                      f"~{group_s:.0f} s", case=case.name, dtype=name)
                continue
            start = time.time()
            seed += 1
            regions = box_regions(layout_boxes(case.instances), *case.grid)
            length = TokenLayout.build(regions, chunk=case.chunk).length
            q, k, v = _qkv(torch, length, heads, dim, dtype, ctx.device, seed)
            for order in _ORDERS:
                tokens = TokenLayout.build(regions, chunk=case.chunk,
                                           order=membership_order(regions) if order == "membership" else None)
                tokens = tokens.to(ctx.device)
                for phases in phase_sets(cuda):
                    _check_one(ctx, torch, case, order, tokens, phases, q, k, v, ref_dtype)
            del q, k, v
            if cuda:
                torch.cuda.empty_cache()
            mine = [r for r in ctx.rows.mine() if r.get("case") == case.name and r.get("dtype") == name]
            passed = sum(r["status"] == "ok" for r in mine)
            worst = max((r.get("rel_err", 0) for r in mine if r.get("rel_err") is not None), default=float("nan"))
            print(f"  {case.name} {name}: {passed}/{len(mine)} pass, worst rel. error {worst:.2e}, "
                  f"{time.time() - start:.1f} s", flush=True)
            group_s = max(group_s / 4, time.time() - start)  # the next group: like this one (its dtype compiled)


def attention_bench(ctx: Any) -> None:
    """Part 4: `threedis bench attention` on the same shapes, every backend, both phases, one row each."""
    import torch
    from threedis.kernels import bench_attention as bench

    cuda = ctx.device.type == "cuda"
    cases = _cases(cuda) if cuda else [bench.Case("64x64-n9", 64, 64, 9, chunk=4)]
    dtype = torch.bfloat16 if cuda else torch.float32
    warmup, reps, heads = (5, 30, bench.HEADS) if cuda else (0, 1, 2)
    compiled = bench.compile_flex(ctx.device)
    each_s = 20.0 if cuda else 1.0  # one (case, phase), a FlexAttention compile included
    with bench.many_compiles():
        for case, phase in itertools.product(cases, bench.PHASES):
            if not ctx.clock.fits(each_s):
                ctx.rows.not_measured("attention", f"budget: {ctx.clock.left():.0f} s left", case=case.name,
                                      phase=phase)
                continue
            start = time.time()
            rows = bench.run_case(case, phase, ["flash", "triton", "flex", "sdpa"], dtype, ctx.device, warmup, reps,
                                  compiled_flex=compiled, heads=heads)
            for row in rows:
                if "skipped" in row:
                    ctx.rows.not_measured("attention", row.pop("skipped"), **row)
                elif "error" in row:
                    ctx.rows.emit("attention", "error", **row)
                else:
                    ctx.rows.emit("attention", **row)
            print(bench.format_table(rows).split("\n", 2)[-1], flush=True)
            if cuda:
                torch.cuda.empty_cache()
                fatal = [r for r in rows if "error" in r and is_fatal_cuda_error(RuntimeError(r["error"]))]
                if fatal:
                    raise RuntimeError(fatal[0]["error"])
            each_s = max(each_s / 4, time.time() - start)
