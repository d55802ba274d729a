"""The fused Triton kernel against a float64 dense masked softmax (rule.dense_allowed as the mask).

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py before triton is imported, and repeated here as a guard), so shapes
stay small; one test compiles the kernel for sm_90/sm_89/sm_80 without a GPU. Tolerance follows PyTorch's
own error: the kernel may be at most ~2x further from the float64 reference
than a plain PyTorch implementation at the same precision, plus a small atol.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton (torch._dynamo does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import torch._dynamo.testing  # noqa: E402

from attention_helpers import assert_close_to_reference, make_qkv, reference  # noqa: E402
from threedis.kernels import triton_attention as ta  # noqa: E402
from threedis.kernels.block_table import block_table, dense_table  # noqa: E402
from threedis.kernels.rule import (  # noqa: E402
    Phases,
    RuleError,
    TokenLayout,
    box_regions,
    dense_allowed,
    mask_regions,
    membership_order,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if ta.available(DEVICE, torch.float32) is not None:  # fail loudly rather than skip every kernel test
    pytest.fail(f"the Triton kernel cannot run here: {ta.available(DEVICE, torch.float32)}", pytrace=False)

def run_poisoned(q, k, v, tokens, phases, config):
    """Launch directly into a NaN-filled output so unwritten elements are caught."""
    length = q.shape[1]
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    if phases is None:
        table = dense_table(length, config.block_m, config.block_n, DEVICE)
        member = torch.zeros(length, dtype=torch.int64, device=DEVICE)
        kind = torch.zeros(length, dtype=torch.int8, device=DEVICE)
        bits = (0, 0)
    else:
        table = block_table(tokens, phases, config.block_m, config.block_n, DEVICE)
        member, kind = tokens.member.to(DEVICE), tokens.kind.to(DEVICE)
        bits = phases.restricted_kinds()
    return ta.launch(q, k, v, member, kind, table.kv_index, table.kv_count, table.kv_full, *bits,
                     config.block_m, config.block_n, config.num_warps, config.num_stages, out=out)


def layout(name: str) -> TokenLayout:
    """Small layouts with ragged lengths; each stresses one part of the rule."""
    if name == "overlap":  # two overlapping boxes, raster order; L = 3*7 + 9*13 = 138
        return TokenLayout.build(box_regions([(0.0, 0.0, 0.55, 0.6), (0.3, 0.2, 1.0, 1.0)], 9, 13), chunk=7)
    if name.startswith("sparse"):  # 3 boxes, long chunks: many skipped and mask-free tiles; L = 4*32 + 12*12 = 272
        regions = box_regions([(0.0, 0.0, 0.45, 0.5), (0.5, 0.0, 1.0, 0.6), (0.2, 0.55, 0.9, 1.0)], 12, 12)
        order = membership_order(regions) if name.endswith("permuted") else None
        return TokenLayout.build(regions, chunk=32, order=order)
    if name == "whole_and_empty":  # one region covers every cell, one covers none; L = 4*6 + 10*11 = 134
        regions = torch.zeros(3, 10, 11, dtype=torch.bool)
        regions[0] = True
        regions[2, 2:6, 3:9] = True
        return TokenLayout.build(regions, chunk=6)
    if name == "masks":  # random masks resized to the grid; L = 4*11 + 15*16 = 284
        gen = torch.Generator().manual_seed(5)
        masks = [torch.rand(7, 9, generator=gen) - 0.6 for _ in range(3)]
        return TokenLayout.build(mask_regions(masks, 15, 16), chunk=11)
    if name == "tiny":  # L = 2*5 + 5*7 = 45
        return TokenLayout.build(box_regions([(0.2, 0.1, 0.8, 0.7)], 5, 7), chunk=5)
    raise KeyError(name)


ON = Phases(True, True, True, True)
CASES = [
    # (layout, phases, dtype, B, H, D, (BLOCK_M, BLOCK_N), packed views)
    ("overlap", ON, torch.float32, 2, 3, 32, (32, 32), True),
    ("sparse_permuted", ON, torch.float16, 2, 2, 64, (32, 32), False),
    ("sparse", Phases(False, True, True, True), torch.float32, 1, 2, 32, (32, 16), True),
    ("whole_and_empty", Phases(True, False, True, False), torch.float32, 1, 2, 16, (16, 32), True),
    ("masks", Phases(True, True, False, True), torch.float16, 2, 1, 32, (32, 32), True),
    ("tiny", Phases(False, False, True, True), torch.float32, 1, 1, 128, (16, 16), False),
    ("overlap", Phases(False, False, False, False), torch.float16, 1, 2, 16, (32, 32), False),
    ("overlap", None, torch.float16, 2, 2, 32, (32, 64), True),
]


def case_id(case) -> str:
    name, phases, dtype, *_, dim, (bm, bn), _ = case
    bits = "none" if phases is None else "".join("1" if on else "0" for on in phases.__dict__.values())
    return f"{name}-{bits}-{str(dtype)[6:]}-d{dim}-{bm}x{bn}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_kernel_matches_float64_reference(index):
    name, phases, dtype, batch, heads, dim, (bm, bn), packed = CASES[index]
    tokens = layout(name)
    q, k, v = make_qkv(batch, tokens.length, heads, dim, dtype, DEVICE, seed=100 + index, packed=packed)
    config = ta.KernelConfig(bm, bn, 4, 2)
    out = run_poisoned(q, k, v, tokens, phases, config)
    assert_close_to_reference(out, q, k, v, dense_allowed(tokens, phases), label=case_id(CASES[index]))


def test_public_attention_uses_the_op_and_matches_reference():
    tokens = layout("sparse_permuted")
    q, k, v = make_qkv(1, tokens.length, 2, 32, torch.float16, DEVICE, seed=11, packed=True)
    out = ta.attention(q, k, v, tokens, ON)
    assert out.shape == q.shape and out.is_contiguous()
    assert_close_to_reference(out, q, k, v, dense_allowed(tokens, ON), label="public")
    plain = ta.attention(q, k, v, None, None)
    assert_close_to_reference(plain, q, k, v, dense_allowed(tokens, None), label="public plain")


def test_full_flags_off_gives_the_same_result():
    """Masking a tile that is all-allowed must change nothing: the two kernel paths agree."""
    tokens = layout("sparse_permuted")
    q, k, v = make_qkv(1, tokens.length, 2, 16, torch.float32, DEVICE, seed=3, packed=False)
    table = block_table(tokens, ON, 32, 32, DEVICE)
    assert 0 < table.full_fraction < table.tile_fraction < 1, "layout should have skipped and mask-free tiles"
    member, kind = tokens.member.to(DEVICE), tokens.kind.to(DEVICE)
    args = (member, kind, table.kv_index, table.kv_count)
    fast = torch.ops.threedis.masked_attention(q, k, v, *args, table.kv_full, *ON.restricted_kinds(), 32, 32, 4, 2)
    slow = torch.ops.threedis.masked_attention(
        q, k, v, *args, torch.zeros_like(table.kv_full), *ON.restricted_kinds(), 32, 32, 4, 2
    )
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # other query blocks do visit the poisoned tiles
def test_skipped_tiles_are_never_loaded():
    """Per query block, NaN in every key/value block its table skips must not reach its rows."""
    tokens = layout("sparse")  # raster order: skipped tiles scattered over many query blocks
    config = ta.KernelConfig(32, 32, 1, 1)
    table = block_table(tokens, ON, config.block_m, config.block_n, DEVICE)
    q, k, v = make_qkv(1, tokens.length, 1, 16, torch.float32, DEVICE, seed=21, packed=False)
    expected = reference(q, k, v, dense_allowed(tokens, ON))
    checked = 0
    for block in range(table.num_q_blocks):
        visited = set(table.kv_index[block, : int(table.kv_count[block])].tolist())
        skipped = [j for j in range(table.num_kv_blocks) if j not in visited]
        if not skipped:
            continue
        k_bad, v_bad = k.clone(), v.clone()
        for j in skipped:
            k_bad[:, j * 32 : (j + 1) * 32] = float("nan")
            v_bad[:, j * 32 : (j + 1) * 32] = float("nan")
        rows = slice(block * 32, (block + 1) * 32)
        out = run_poisoned(q, k_bad, v_bad, tokens, ON, config)[:, rows]
        torch.testing.assert_close(out.double(), expected[:, rows], rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked >= 3, "layout should give several query blocks with skipped tiles"


def test_custom_op_opcheck_and_compile_without_graph_breaks():
    """opcheck (schema, fake impl, autograd registration, AOT dispatch); compile(fullgraph): no break, no recompile."""
    tokens = layout("tiny")
    q, k, v = make_qkv(1, tokens.length, 1, 16, torch.float32, DEVICE, seed=4, packed=False)
    table = block_table(tokens, ON, 16, 16, DEVICE)
    member, kind = tokens.member.to(DEVICE), tokens.kind.to(DEVICE)
    args = [q, k, v, member, kind, table.kv_index, table.kv_count, table.kv_full, *ON.restricted_kinds(), 16, 16, 1, 1]
    torch.library.opcheck(torch.ops.threedis.masked_attention.default, tuple(args))

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda *a: torch.ops.threedis.masked_attention(*a) * 2.0, backend=counter, fullgraph=True)
    first = compiled(*args)
    args[7] = torch.zeros_like(table.kv_full)  # a different table of the same shape: new data, same graph
    second = compiled(*args)
    assert counter.frame_count == 1
    expected = reference(q, k, v, dense_allowed(tokens, ON)).float() * 2.0
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, expected, rtol=1e-4, atol=1e-4)


def test_compiled_flux_transformer_has_no_graph_break_and_one_graph_per_phase_set(small_flux_transformer):
    """torch.compile(fullgraph=True) of a tiny FLUX transformer with the Triton backend, tables prepared per phase.

    fullgraph fails on any graph break (a Python launcher, importlib, torch.unique on a cold cache...);
    the compile count shows a phase change costs one graph, and a repeat of the same phases or a new
    layout (new block-table data) none.
    """
    from threedis.engine.processor import AttentionCall
    from threedis.kernels.attention import prepare_attention

    model, args = small_flux_transformer
    model = model.to(DEVICE)
    regions = box_regions([(0.0, 0.0, 0.7, 0.6), (0.4, 0.3, 1.0, 1.0)], 4, 5)
    tokens = TokenLayout.build(regions, chunk=5, order=membership_order(regions)).to(DEVICE)  # L = 15 + 20
    args["img_ids"] = args["img_ids"][tokens.order]
    args = {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    later = Phases(False, True, True, True)
    with torch.no_grad():
        for count, phases in ((1, ON), (2, later), (2, later)):
            prepare_attention(tokens, phases, DEVICE, torch.float32, "triton")
            call = {"threedis": AttentionCall(tokens, phases, "triton")}
            out = compiled(**args, joint_attention_kwargs=call)[0]
            assert counter.frame_count == count, f"{phases}: {counter.frame_count} graphs, expected {count}"
            eager = model(**args, joint_attention_kwargs=call)[0]
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        # Another layout of the same length: new table tensors are inputs to the same graph, not constants.
        other = TokenLayout.build(box_regions([(0.5, 0.0, 1.0, 1.0), (0.0, 0.5, 0.6, 1.0)], 4, 5), chunk=5).to(DEVICE)
        prepare_attention(other, ON, DEVICE, torch.float32, "triton")
        call = {"threedis": AttentionCall(other, ON, "triton")}
        out = compiled(**args, joint_attention_kwargs=call)[0]
        assert counter.frame_count == 2, "a new layout with the same phases must reuse the compiled graph"
        torch.testing.assert_close(out, model(**args, joint_attention_kwargs=call)[0], rtol=1e-5, atol=1e-5)


def test_auto_picks_triton_on_cuda_and_says_why(monkeypatch, caplog):
    """With the kernel available on CUDA, auto chooses it first; the reason is returned and logged at debug."""
    import logging

    from threedis.kernels.attention import select_backend

    monkeypatch.setattr(ta, "available", lambda device, dtype: None)
    caplog.set_level(logging.DEBUG, logger="threedis.kernels")
    name, reason = select_backend("cuda", torch.bfloat16)
    assert name == "triton" and "cuda / bfloat16" in reason and reason in caplog.text
    monkeypatch.setattr(ta, "available", lambda device, dtype: "switched off for this test")
    name, reason = select_backend("cuda", torch.bfloat16)
    assert name != "triton" and "triton: switched off for this test" in reason


def test_attention_benchmark_writes_keyed_rows(tmp_path, capsys):
    """`threedis bench attention` at a CPU shape: every backend row keyed and filled, density checked densely."""
    import json

    from threedis.kernels import bench_attention as bench

    argv = ["--device", "cpu", "--cases", "256x256-n2", "--phases", "early", "--heads", "1", "--warmup", "0",
            "--reps", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    assert "x flash" in capsys.readouterr().out
    (path,) = tmp_path.glob("attention-*.jsonl")
    rows = {row["backend"]: row for row in map(json.loads, path.read_text().splitlines())}
    assert set(rows) == {"flash", "triton", "flex", "sdpa"}
    case = bench.Case("256x256-n2", 256, 256, 2, chunk=32)
    regions = box_regions(bench.layout_boxes(2), *case.grid)
    exact = dense_allowed(TokenLayout.build(regions, chunk=32), ON).double().mean().item()
    if ta.available("cpu", torch.float32) is not None:  # a CUDA machine: no interpreter, the CPU row says why
        assert "CUDA" in rows.pop("triton")["skipped"]
    for name, row in rows.items():
        assert "skipped" not in row, row.get("skipped")
        assert {"torch", "triton", "python"} <= set(row["versions"]) and row["device"] == "cpu"
        assert row["shape"] == {"B": 1, "L": case.length, "H": 1, "D": 128, "width": 256, "height": 256,
                                "instances": 2, "chunk": 32} and row["dtype"] == "float32"
        assert row["p50_ms"] > 0 and row["density"] == pytest.approx(exact)
        assert row["tflops_computed"] is None and row["ratio_to_flash"] is None  # CPU: no speed figures
    assert exact <= rows["flex"]["tile_fraction"] < 1 and rows["flex"]["tiles"] == [32, 32]
    if "triton" in rows:
        assert rows["triton"]["tile_fraction"] == rows["flex"]["tile_fraction"] and rows["triton"]["tiles"] == [32, 32]
    assert rows["sdpa"]["tile_fraction"] == 1.0


def test_available_and_clear_errors():
    assert ta.available(DEVICE, torch.float32) is None
    assert "dtype" in ta.available(DEVICE, torch.float64)
    if DEVICE.type == "cpu":
        assert "interpreter" in ta.available("cpu", torch.bfloat16)
    tokens = layout("tiny")
    q = torch.zeros(1, tokens.length, 1, 48, device=DEVICE)
    with pytest.raises(RuleError, match="head dim 48"):
        ta.attention(q, q, q, tokens, ON)
    with pytest.raises(RuleError, match="describes"):
        ta.attention(q[:, :-1], q[:, :-1], q[:, :-1], tokens, ON)
    with pytest.raises(RuleError, match="one shape"):
        ta.attention(q, q, q[..., :16], tokens, ON)


COMPILE_SCRIPT = """
import re
import torch
from threedis.kernels import triton_attention as ta
# FLUX (bf16, D=128) on H100 and on a ~99 KB consumer card; fp16 D=64 on A100.
for capability, dtype, head_dim in [(90, torch.bfloat16, 128), (89, torch.bfloat16, 128), (80, torch.float16, 64)]:
    kernel = ta.compile_ahead(capability, dtype, head_dim)
    shared, limit = kernel.metadata.shared, ta.SHARED_MEMORY[capability]
    print(capability, dtype, head_dim, "shared", shared, "of", limit)
    assert "mma" in kernel.asm["ptx"], "the two dots should use tensor cores"
    assert shared <= limit, f"sm_{capability}: {shared} bytes of shared memory, the card has {limit}: launch would fail"
    buffers = re.findall(r"memdesc<\\d+x64x%dx(?:bf16|f16)" % head_dim, kernel.asm["ttgir"])
    assert buffers, "K/V tiles should be loaded asynchronously into pipeline buffers"
"""


def test_kernel_compiles_for_cuda_targets_without_a_gpu():
    """The interpreter accepts code the compiler rejects: build PTX/cubin for sm_90, sm_89 and sm_80 in a clean process.

    Arguments are specialised as at a real launch, so the shared-memory size checked
    against each card's limit is the one a launch would need.
    """
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    print(done.stdout, done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]


def test_module_imports_without_triton():
    """threedis.kernels.triton_attention must import when triton is missing; available() says why."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from threedis.kernels import triton_attention as ta\n"
        "print(ta.available('cuda', torch.float16))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "triton is not installed" in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_eager_and_compiled_against_float64():
    """Default GPU tiles, bf16, FLUX head dim; the op under torch.compile(fullgraph) with Inductor."""
    regions = box_regions([(0.0, 0.0, 0.5, 0.5), (0.4, 0.3, 1.0, 0.9), (0.1, 0.6, 0.6, 1.0)], 40, 36)
    tokens = TokenLayout.build(regions, chunk=64, order=membership_order(regions))  # L = 256 + 1440
    q, k, v = make_qkv(2, tokens.length, 4, 128, torch.bfloat16, DEVICE, seed=0, packed=True)
    config = ta.choose_config(DEVICE, torch.bfloat16, 128)
    op = torch.compile(lambda *args: torch.ops.threedis.masked_attention(*args), fullgraph=True)
    for phases in (ON, Phases(False, True, True, True), None):
        allowed = dense_allowed(tokens, phases)
        eager = ta.attention(q, k, v, tokens, phases)
        assert_close_to_reference(eager, q, k, v, allowed, label=f"gpu bf16 eager {phases}")
        poisoned = run_poisoned(q, k, v, tokens, phases, config)
        assert_close_to_reference(poisoned, q, k, v, allowed, label=f"gpu bf16 poisoned {phases}")
        if phases is not None:
            table = block_table(tokens, phases, config.block_m, config.block_n, DEVICE)
            member, kind = tokens.member.to(DEVICE), tokens.kind.to(DEVICE)
            out = op(q, k, v, member, kind, table.kv_index, table.kv_count, table.kv_full, *phases.restricted_kinds(),
                     config.block_m, config.block_n, config.num_warps, config.num_stages)
            assert_close_to_reference(out, q, k, v, allowed, label=f"gpu bf16 compiled {phases}")
