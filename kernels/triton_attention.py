"""Fused masked joint attention (forward) in Triton, block-sparse over the 3DIS rule.

Why a kernel of our own: PyTorch's flash-style SDPA backends take no arbitrary
mask, and a dense mask costs O(L^2) memory. Here the rule is evaluated inside
the kernel from O(L) data (membership int64, kind int8, two restriction ints),
and only for tiles that need it: a `BlockTable` lists, per query block, the key
blocks holding any allowed pair (others are never loaded) and flags tiles
where every pair is allowed (no mask arithmetic at all).

Layers, as in Triton's fused-attention tutorial: `_attn_fwd_inner` (loop over
one query block's key blocks), `_masked_attn_fwd` (kernel), `launch`
(launcher over raw tensors, registered as the custom op
`torch.ops.threedis.masked_attention` with the same parameters), `attention`
(public, backend-registry contract).
Online softmax in base 2 with fp32 accumulation; fp16/bf16/fp32 inputs.
With phases None the same kernel runs over a dense all-visited table (plain
attention), so the kernel is one code path.

The module imports without triton; `available()` then says why it cannot run.
"""

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from threedis.kernels.block_table import BlockTable, block_table, dense_table
from threedis.kernels.rule import (
    KIND_IMAGE, KIND_INSTANCE_TEXT, Phases, RuleError, TokenLayout, concrete_device,
)

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the environment
    triton = None
    _MISSING = f"triton is not installed ({exc})"
else:
    _MISSING = None

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HEAD_DIMS = (16, 32, 64, 128)  # powers of two for tl.arange; FLUX uses 128

if triton is not None:
    _KIND_IMAGE = tl.constexpr(KIND_IMAGE)
    _KIND_INSTANCE_TEXT = tl.constexpr(KIND_INSTANCE_TEXT)

    @triton.jit
    def _tile_allowed(r_q, member_q, Member, Kind, offs_n, seq_len):
        """allowed[BLOCK_M, BLOCK_N] for one tile (SPEC section 3), key bounds included."""
        in_bounds = offs_n < seq_len
        member_k = tl.load(Member + offs_n, mask=in_bounds, other=0)
        kind_k = tl.load(Kind + offs_n, mask=in_bounds, other=0).to(tl.int32)
        restricted = (r_q[:, None] & (1 << kind_k)[None, :]) != 0
        shares = (member_q[:, None] & member_k[None, :]) != 0
        return ((restricted == 0) | shares) & in_bounds[None, :]

    @triton.jit
    def _attn_fwd_inner(
        acc, l_i, m_i, q,  #
        k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,  #
        Member, Kind, r_q, member_q,  #
        row_index, row_full, kv_count, seq_len, qk_scale, offs_d,  #
        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        for j in range(0, kv_count):
            kv_block = tl.load(row_index + j)
            full = tl.load(row_full + j)
            offs_n = kv_block * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_ok = (offs_n < seq_len)[:, None]
            # -- compute qk (log2 units) --
            k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if full == 0:
                qk = tl.where(_tile_allowed(r_q, member_q, Member, Kind, offs_n, seq_len), qk, float("-inf"))
            # -- online softmax update; rows with nothing allowed yet keep m = -inf --
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.math.exp2(qk - m_shift[:, None])
            alpha = tl.math.exp2(m_i - m_shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            # -- accumulate p @ v --
            v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_ij
        return acc, l_i, m_i

    # Values that change between phases or layouts are not specialised on (1 -> constant, multiple
    # of 16 -> hint): each distinct specialisation would be one more JIT compile in the middle of a render.
    @triton.jit(do_not_specialize=["seq_len", "image_bits", "text_bits", "max_kv"])
    def _masked_attn_fwd(
        Q, K, V, Out,  #
        Member, Kind, KvIndex, KvFull, KvCount,  #
        qk_scale, seq_len, num_heads, image_bits, text_bits, max_kv,  #
        stride_qb, stride_ql, stride_qh, stride_qd,  #
        stride_kb, stride_kl, stride_kh, stride_kd,  #
        stride_vb, stride_vl, stride_vh, stride_vd,  #
        stride_ob, stride_ol, stride_oh, stride_od,  #
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        off_b = (off_bh // num_heads).to(tl.int64)
        off_h = (off_bh % num_heads).to(tl.int64)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < seq_len

        # -- load q once: [BLOCK_M, HEAD_DIM] --
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)

        # -- per-query rule data: membership and the key kinds it is restricted towards --
        member_q = tl.load(Member + offs_m, mask=row_ok, other=0)
        kind_q = tl.load(Kind + offs_m, mask=row_ok, other=0).to(tl.int32)
        r_q = tl.where(kind_q == _KIND_INSTANCE_TEXT, text_bits, 0)
        r_q = tl.where((kind_q == _KIND_IMAGE) & (member_q != 0), image_bits, r_q)

        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        kv_count = tl.load(KvCount + start_m)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q,  #
            K + off_b * stride_kb + off_h * stride_kh, V + off_b * stride_vb + off_h * stride_vh,  #
            stride_kl, stride_kd, stride_vl, stride_vd,  #
            Member, Kind, r_q, member_q,  #
            KvIndex + start_m * max_kv, KvFull + start_m * max_kv, kv_count, seq_len, qk_scale, offs_d,  #
            BLOCK_N, DOT_PRECISION,
        )

        # -- epilogue: normalise; a row with no allowed key (never under SPEC's rule) gives 0, not NaN --
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        o_base = Out + off_b * stride_ob + off_h * stride_oh
        tl.store(o_base + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])


def _interpreter_state() -> tuple[bool, bool]:
    """(kernel built by Triton's CPU interpreter, triton.language built by it too).

    Triton reads TRITON_INTERPRET when a function is decorated, so it must be set
    before anything imports triton (torch._dynamo does); a half-interpreted
    setup fails inside the kernel with an obscure error.
    """
    if triton is None:
        return False, False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_masked_attn_fwd, InterpretedFunction), isinstance(tl.zeros, InterpretedFunction)


def _interpreting() -> bool:
    return _interpreter_state()[0]


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch settings; the block table depends on block_m/block_n."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# Opt-in shared memory per block (bytes) by compute capability, from NVIDIA's tables. Consumer
# chips (8.6, 8.9, 12.x) have ~99 KB, where three K/V pipeline stages at head dim 128 do not fit.
SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
_DEEP_PIPELINE_BYTES = 140 * 1024  # bf16/fp16, 128x64 tiles, D=128, 3 stages: 112-128 KB (sm_80 / sm_90)


def config_for(shared_memory: int, dtype: torch.dtype) -> KernelConfig:
    """The CUDA config for a card with `shared_memory` bytes per block (opt-in) and this dtype."""
    if dtype == torch.float32:
        return KernelConfig(64, 32, 4, 2)
    return KernelConfig(128, 64, 8, 3 if shared_memory >= _DEEP_PIPELINE_BYTES else 2)


def _shared_memory(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    found = getattr(props, "shared_memory_per_block_optin", None)
    if found:
        return int(found)
    return SHARED_MEMORY.get(props.major * 10 + props.minor, min(SHARED_MEMORY.values()))


def choose_config(device: torch.device, dtype: torch.dtype, head_dim: int) -> KernelConfig:
    """Fixed tile shapes per (device kind, shared memory, dtype); not autotuned, so block tables stay cacheable.

    Tiles do not depend on the head dim (64 and 128 share them); the pipeline depth
    depends on the card's shared memory. Checked with ptxas (see `compile_ahead`):
    at runtime specialisation, bf16 D=128 needs 128 KB on sm_90 (3 stages), 112 KB on
    sm_80 (3 stages) and 80 KB on sm_86/89 (2 stages). Not yet timed on a GPU.
    """
    if device.type != "cuda":  # Triton's CPU interpreter: small tiles, few numpy ops per program
        return KernelConfig(32, 32, 1, 1)
    return config_for(_shared_memory(device), dtype)


def available(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None when the kernel runs on this device/dtype, else why not."""
    device = torch.device(device)
    if _MISSING is not None:
        return _MISSING
    if dtype not in _DTYPES:
        return f"dtype {dtype} is not supported (use float16, bfloat16 or float32)"
    kernel_interpreted, language_interpreted = _interpreter_state()
    if kernel_interpreted != language_interpreted:
        return (
            "TRITON_INTERPRET changed between importing triton and this module; "
            "set it before anything imports triton (e.g. at the top of conftest.py)"
        )
    if kernel_interpreted:
        if device.type != "cpu":
            return "Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors only"
        if dtype == torch.bfloat16:
            return "bfloat16 is not supported by Triton's CPU interpreter (numpy has no bfloat16)"
        return None
    if device.type != "cuda":
        return "the Triton kernel needs a CUDA device (TRITON_INTERPRET=1 at import runs it slowly on CPU for tests)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8 and dtype == torch.bfloat16:
        return "bfloat16 needs compute capability 8.0 or newer"
    return None


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    member: torch.Tensor,
    kind: torch.Tensor,
    kv_index: torch.Tensor,
    kv_count: torch.Tensor,
    kv_full: torch.Tensor,
    image_bits: int,
    text_bits: int,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    *,
    out: torch.Tensor | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Run the kernel over raw tensors; its positional parameters are the custom op's (one definition).

    q, k, v: [B, L, H, D], any strides (diffusers' views need no copy); member int64[L],
    kind int8[L]; the table tensors as in `BlockTable`. Returns `out` (a new contiguous
    [B, L, H, D] when None; tests pass a NaN-filled one to catch unwritten elements).
    """
    if triton is None:
        raise RuleError(f"the Triton attention backend cannot run: {_MISSING}")
    batch, length, heads, head_dim = q.shape
    if head_dim not in _HEAD_DIMS:
        raise RuleError(f"head dim {head_dim} is not supported by the Triton kernel; use one of {_HEAD_DIMS}")
    if min(block_m, block_n) < 16:
        raise RuleError(f"block sizes must be at least 16 (tl.dot), got {block_m}x{block_n}")
    if member.numel() != length or kind.numel() != length or kv_index.shape[0] != triton.cdiv(length, block_m):
        raise RuleError(
            f"rule tensors / block table do not fit L={length}, block_m={block_m}: member {tuple(member.shape)}, "
            f"kind {tuple(kind.shape)}, table {tuple(kv_index.shape)}"
        )
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    tensors = (q, k, v, out)
    span = max(abs(t.stride(1)) for t in tensors) * length + max(abs(t.stride(3)) for t in tensors) * head_dim
    if span >= 2**31:  # in-slice offsets are int32 in the kernel
        raise RuleError("one (batch, head) slice spans more than 2**31 elements; split the batch")
    scale = (1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale) * _LOG2E
    grid = (triton.cdiv(length, block_m), batch * heads)
    _masked_attn_fwd[grid](
        q, k, v, out,  #
        member, kind, kv_index, kv_full, kv_count,  #
        scale, length, heads, image_bits, text_bits, kv_index.shape[1],  #
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),  #
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _op_signature() -> inspect.Signature:
    """`launch`'s positional parameters: the op takes exactly those (tensors and plain numbers only)."""
    signature = inspect.signature(launch)
    kept = [p for p in signature.parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    return signature.replace(parameters=kept)


def _op_body(*args: Any, **kwargs: Any) -> torch.Tensor:
    return launch(*args, **kwargs)


# The kernel as a PyTorch custom op, `torch.ops.threedis.masked_attention`. Why an op: torch.compile
# then sees one opaque node with a fake (shape-only) implementation instead of a Python launcher it
# cannot trace, so there is no graph break, and the block table is an ordinary tensor input: a new
# table (phase change) is new data, not a recompile. `torch.library.custom_op` (not `triton_op`) so
# the op also runs under Triton's CPU interpreter, where kernels are not `JITFunction`s and
# `wrap_triton` refuses them; the kernel stays opaque to Inductor either way.
_op_body.__signature__ = _op_signature()
masked_attention = torch.library.custom_op("threedis::masked_attention", _op_body, mutates_args=())


@masked_attention.register_fake
def _masked_attention_fake(q: torch.Tensor, *rest: Any) -> torch.Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, L, H, D], contiguous like launch's


def _rule_tensors(tokens: TokenLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """member int64[L] and kind int8[L] on the kernel's device, memoised on the layout."""
    key = ("triton_rule_tensors", device)
    found = tokens.cache.get(key)
    if found is None:
        found = (tokens.member.to(device, torch.int64).contiguous(), tokens.kind.to(device, torch.int8).contiguous())
        tokens.cache[key] = found
    return found


def _require_available(device: torch.device, dtype: torch.dtype, tokens: TokenLayout | None) -> None:
    """Raise unless the kernel runs here; a pass is memoised on the layout.

    The memo keeps device queries (torch.cuda capability, interpreter state) out of
    the per-call path, which torch.compile traces.
    """
    key = ("triton_available", device, dtype)
    if tokens is not None and tokens.cache.get(key):
        return
    reason = available(device, dtype)
    if reason is not None:
        raise RuleError(f"the Triton attention backend cannot run on {device} / {dtype}: {reason}")
    if tokens is not None:
        tokens.cache[key] = True


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: TokenLayout | None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise RuleError(
            f"q, k, v must all be [B, L, H, D] of one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise RuleError("q, k, v must share one dtype and one device")
    if tokens is not None and tokens.length != q.shape[1]:
        raise RuleError(f"the token layout describes {tokens.length} tokens but q has L={q.shape[1]}")
    _require_available(q.device, q.dtype, tokens)


def _layout_config(tokens: TokenLayout | None, device: torch.device, dtype: torch.dtype, head_dim: int) -> KernelConfig:
    """`choose_config`, memoised on the layout: it queries the card, which has no place in a compiled graph.

    Keyed without the head dim: tiles do not depend on it.
    """
    if tokens is None:
        return choose_config(device, dtype, head_dim)
    key = ("triton_config", device, dtype)
    found = tokens.cache.get(key)
    if found is None:
        found = tokens.cache[key] = choose_config(device, dtype, head_dim)
    return found


def prepare(tokens: TokenLayout, phases: Phases, device: torch.device | str, dtype: torch.dtype) -> None:
    """Build, outside any compiled region, what `attention` reads for this layout and phase set.

    Everything lands in `tokens.cache` (availability, rule tensors, block table), so a
    later call only looks it up: torch.compile then traces a warm call without a
    graph break (a cold one runs torch.unique and device queries, which it cannot trace).
    """
    device = concrete_device(device)
    _require_available(device, dtype, tokens)
    tiles(tokens, phases, device, dtype)
    _rule_tensors(tokens, device)


def tiles(tokens: TokenLayout, phases: Phases, device: torch.device | str, dtype: torch.dtype) -> BlockTable:
    """The block table this kernel uses for the layout and phase set (cached on the layout)."""
    device = concrete_device(device)
    config = _layout_config(tokens, device, dtype, 128)  # FLUX's head dim; tiles do not depend on it
    return block_table(tokens, phases, config.block_m, config.block_n, device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens: TokenLayout | None,
    phases: Phases | None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Masked joint attention under the 3DIS rule; q, k, v: [B, L, H, D] -> [B, L, H, D] (contiguous).

    tokens or phases None: plain attention through the same kernel (dense table).
    """
    _check_inputs(q, k, v, tokens)
    config = config or _layout_config(tokens, q.device, q.dtype, q.shape[-1])
    length = q.shape[1]
    if tokens is None or phases is None:
        table: BlockTable = dense_table(length, config.block_m, config.block_n, q.device)
        member = torch.zeros(length, dtype=torch.int64, device=q.device)
        kind = torch.zeros(length, dtype=torch.int8, device=q.device)
        image_bits, text_bits = 0, 0
    else:
        table = block_table(tokens, phases, config.block_m, config.block_n, q.device)
        member, kind = _rule_tensors(tokens, q.device)
        image_bits, text_bits = phases.restricted_kinds()
    return masked_attention(
        q, k, v, member, kind, table.kv_index, table.kv_count, table.kv_full,
        image_bits, text_bits, config.block_m, config.block_n, config.num_warps, config.num_stages,
    )  # [B, L, H, D]


def compile_ahead(capability: int, dtype: torch.dtype, head_dim: int, config: KernelConfig | None = None):
    """Compile the kernel for a CUDA target without a GPU (Triton's AST -> PTX -> cubin).

    CI has no GPU; this at least proves the kernel builds as compiled code (the
    interpreter accepts things the compiler rejects). Arguments are specialised as
    Triton's launcher does for diffusers' inputs (unit head-dim strides become
    constants; pointers and other strides are multiples of 16), so vectorised loads,
    K/V pipelining and the shared-memory size match a real launch. Needs
    TRITON_INTERPRET unset at import. Returns Triton's CompiledKernel (asm, metadata.shared).
    """
    if triton is None or _interpreting():
        raise RuntimeError("compile_ahead needs triton imported without TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget

    config = config or config_for(SHARED_MEMORY.get(capability, min(SHARED_MEMORY.values())), dtype)
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    arg_names = _masked_attn_fwd.arg_names
    signature = {name: "i32" for name in arg_names}  # strides, sizes, bits
    signature.update({name: f"*{names[dtype]}" for name in ("Q", "K", "V", "Out")})
    signature.update(Member="*i64", Kind="*i8", KvIndex="*i32", KvFull="*i8", KvCount="*i32", qk_scale="fp32")
    constexprs = {
        "HEAD_DIM": head_dim,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        **{f"stride_{t}d": 1 for t in "qkvo"},  # the launcher turns an int equal to 1 into a constant
    }
    signature.update({name: "constexpr" for name in constexprs})
    aligned = ["Q", "K", "V", "Out", "Member", "Kind", "KvIndex", "KvFull", "KvCount"]
    aligned += [f"stride_{t}{axis}" for t in "qkvo" for axis in "blh"]  # H*D, D, L*H*D: multiples of 16
    attrs = {(arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = triton.compiler.ASTSource(fn=_masked_attn_fwd, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
