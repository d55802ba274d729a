"""Every attention backend against a float64 masked-softmax reference written here.

Tolerance follows the flash-attention tests: a backend may be at most ~2x further
from the float64 result than a plain PyTorch implementation at the input precision.
"""

from __future__ import annotations

import logging

import pytest
import torch

from attention_helpers import assert_close_to_reference, make_qkv, reference
from threedis.kernels import flex_backend, rule, sdpa_backend
from threedis.kernels.attention import BACKENDS, masked_joint_attention, select_backend
from threedis.kernels.rule import Phases, RuleError, TokenLayout

ON = Phases(i2i=True, i2t=True, t2i=True, t2t=True)
PHASES = [
    ON,
    Phases(i2i=False, i2t=True, t2i=True, t2t=True),  # after I2I: region image sees global text
    Phases(i2i=True, i2t=False, t2i=False, t2t=False),
    Phases(i2i=False, i2t=False, t2i=True, t2t=False),
]
# (instances, grid h, grid w, chunk, order): lengths that are multiples of no block size
LAYOUTS = [
    (2, 5, 3, 7, None),  # L = 36
    (3, 4, 6, 5, "membership"),  # L = 44
    (0, 3, 3, 2, None),  # no instances: nothing restricted
    (1, 1, 1, 1, None),  # L = 3
    (6, 13, 11, 7, "random"),  # L = 192: several 128 (and 16) tiles, last one ragged
]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


def make_layout(n: int, h: int, w: int, chunk: int, order: str | None, seed: int = 0) -> TokenLayout:
    g = torch.Generator().manual_seed(seed)
    corners = torch.rand(n, 2, 2, generator=g).sort(dim=1).values  # per box: sorted x's and y's
    boxes = [(float(c[0, 0]), float(c[0, 1]), float(c[1, 0]), float(c[1, 1])) for c in corners]
    regions = rule.box_regions(boxes, h, w)
    perm = None
    if order == "membership":
        perm = rule.membership_order(regions)
    elif order == "random":
        perm = torch.randperm(h * w, generator=g)
    return TokenLayout.build(regions, chunk=chunk, order=perm)


def require(backend: str, device: str, dtype: torch.dtype) -> None:
    try:
        select_backend(device, dtype, backend)
    except RuleError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda c: f"n{c[0]}-{c[1]}x{c[2]}-chunk{c[3]}-{c[4]}")
def test_backend_matches_float64_reference(backend, layout, device):
    dtype = torch.float32
    require(backend, device, dtype)
    tokens = make_layout(*layout).to(device)
    if backend == "triton" and device == "cpu" and tokens.length > 64:
        pytest.skip("Triton's CPU interpreter is slow at this length; test_triton_attention covers long sequences")
    q, k, v = make_qkv(2, tokens.length, 3, 16, dtype, device)
    for phases in PHASES:
        out = masked_joint_attention(q, k, v, tokens, phases, backend)
        assert_close_to_reference(out, q, k, v, rule.dense_allowed(tokens, phases), f"{backend} {phases}")


@pytest.mark.parametrize("block", [16, 32])
def test_flex_with_small_tiles_matches_reference(block, monkeypatch):
    """Small tiles give a mix of empty, full and partial tiles on a ragged sequence."""
    monkeypatch.setattr(flex_backend, "BLOCK_SIZE", block)
    tokens = make_layout(6, 13, 11, 7, "membership", seed=1)
    q, k, v = make_qkv(2, tokens.length, 2, 16, torch.float32, "cpu", seed=1)
    for phases in PHASES:
        out = masked_joint_attention(q, k, v, tokens, phases, "flex")
        assert_close_to_reference(out, q, k, v, rule.dense_allowed(tokens, phases), f"flex/{block} {phases}")
    assert all(key[-1] == block for key in tokens.cache if key[:2] == ("flex", "block_mask"))


def tile_lists(num_blocks: torch.Tensor, indices: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Dense [rows, cols] tile map from FlexAttention's (count, indices) per query tile."""
    out = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        out[r, indices[0, 0, r, : int(num_blocks[0, 0, r])].long()] = True
    return out


@pytest.mark.parametrize("block", [16, 128])
def test_block_mask_tiles_agree_with_dense_mask(block):
    """Exact: a tile is skipped iff no pair in it is allowed, and 'full' iff every pair is."""
    tokens = make_layout(4, 9, 10, 6, "membership", seed=2)
    length = tokens.length
    tiles = -(-length // block)
    for phases in PHASES:
        allowed = rule.dense_allowed(tokens, phases)
        padded = torch.zeros(tiles * block, tiles * block, dtype=torch.bool)
        padded[:length, :length] = allowed
        per_tile = padded.reshape(tiles, block, tiles, block)
        bm = flex_backend.block_mask(tokens, phases, torch.device("cpu"), block)
        partial = tile_lists(bm.kv_num_blocks, bm.kv_indices, tiles, tiles)
        full = tile_lists(bm.full_kv_num_blocks, bm.full_kv_indices, tiles, tiles)
        assert not (partial & full).any()
        assert torch.equal(partial | full, per_tile.any(dim=(1, 3))), phases
        # every tile marked full is fully allowed (ragged tail excluded)
        valid = torch.zeros_like(padded)
        valid[:length, :length] = True
        fully_allowed = (padded | ~valid).reshape(tiles, block, tiles, block).all(dim=(1, 3))
        assert not (full & ~fully_allowed).any(), phases


def test_plain_attention_without_layout_or_phases():
    tokens = make_layout(2, 5, 3, 7, None)
    q, k, v = make_qkv(2, tokens.length, 3, 16, torch.float32, "cpu")
    off = Phases(False, False, False, False)
    for t, p in [(None, None), (tokens, None), (None, ON), (tokens, off)]:
        out = masked_joint_attention(q, k, v, t, p)
        assert_close_to_reference(out, q, k, v, None, f"plain tokens={t is not None} phases={p}")
    # with phases None the layout need not describe the sequence (text cut after the hard window)
    short = make_qkv(1, tokens.length - 7, 2, 16, torch.float32, "cpu")
    assert masked_joint_attention(*short, tokens, None).shape == short[0].shape


def test_block_mask_built_once_per_phases(monkeypatch):
    built = []

    def counting(*args, **kwargs):
        built.append(args[3])
        return real(*args, **kwargs)

    real = flex_backend.create_block_mask
    monkeypatch.setattr(flex_backend, "create_block_mask", counting)
    tokens = make_layout(3, 4, 6, 5, None)
    q, k, v = make_qkv(2, tokens.length, 2, 16, torch.float32, "cpu")
    first = [masked_joint_attention(q, k, v, tokens, ON, "flex") for _ in range(3)]
    other = Phases(i2i=False, i2t=True, t2i=True, t2t=True)
    for _ in range(2):
        masked_joint_attention(q, k, v, tokens, other, "flex")
    masked_joint_attention(q, k, v, tokens, ON, "flex")
    assert len(built) == 2
    assert all(torch.equal(first[0], out) for out in first[1:])
    keys = [key for key in tokens.cache if key[:2] == ("flex", "block_mask")]
    assert sorted(str(key[2]) for key in keys) == sorted([str(ON), str(other)])
    # a second layout builds its own, leaving the first one's cache alone
    second = make_layout(3, 4, 6, 5, None, seed=9)
    masked_joint_attention(q, k, v, second, ON, "flex")
    assert len(built) == 3 and len([key for key in tokens.cache if key[:2] == ("flex", "block_mask")]) == 2


def test_dense_mask_built_once_per_phases(monkeypatch):
    calls = []
    real = sdpa_backend.dense_allowed
    monkeypatch.setattr(sdpa_backend, "dense_allowed", lambda t, p: calls.append(p) or real(t, p))
    tokens = make_layout(2, 5, 3, 7, None)
    q, k, v = make_qkv(1, tokens.length, 2, 16, torch.float32, "cpu")
    for phases in [ON, ON, PHASES[1], ON, PHASES[1]]:
        masked_joint_attention(q, k, v, tokens, phases, "sdpa")
    assert calls == [ON, PHASES[1]]


def test_unknown_backend_names_the_valid_ones():
    tokens = make_layout(2, 5, 3, 7, None)
    q, k, v = make_qkv(1, tokens.length, 2, 16, torch.float32, "cpu")
    for call in (
        lambda: masked_joint_attention(q, k, v, tokens, ON, "flash"),
        lambda: masked_joint_attention(q, k, v, None, None, "flash"),
        lambda: select_backend("cpu", torch.float32, "flash"),
    ):
        with pytest.raises(RuleError, match="unknown attention backend 'flash'") as info:
            call()
        for name in ("auto", "sdpa", "flex", "triton"):
            assert name in str(info.value)


def test_sequence_length_mismatch_is_a_clear_error():
    tokens = make_layout(2, 5, 3, 7, None)
    q, k, v = make_qkv(1, tokens.length + 1, 2, 16, torch.float32, "cpu")
    with pytest.raises(RuleError, match=r"sequence length mismatch: attention got L=37 .* describes 36"):
        masked_joint_attention(q, k, v, tokens, ON)
    with pytest.raises(RuleError, match=r"\[B, L, H, D\]"):
        masked_joint_attention(q, k[:, :-1], v, tokens, ON)


def test_auto_selection_on_cpu(caplog):
    caplog.set_level(logging.DEBUG, logger="threedis.kernels")
    name, reason = select_backend("cpu", torch.float32)
    assert name == "sdpa"
    assert "triton" in reason and "FlexAttention" in reason and reason in caplog.text
    assert select_backend("cpu", torch.bfloat16)[0] == "sdpa"
    assert select_backend("cpu", torch.float64, "sdpa")[0] == "sdpa"


def test_auto_falls_back_and_says_why(monkeypatch):
    monkeypatch.setattr(sdpa_backend, "available", lambda device, dtype: "switched off for this test")
    name, reason = select_backend("cpu", torch.float32)
    assert name == "flex" and "switched off for this test" in reason


def test_unavailable_backend_requested_by_name_says_why(monkeypatch):
    monkeypatch.setattr(flex_backend, "available", lambda device, dtype: "switched off for this test")
    with pytest.raises(RuleError, match="'flex' is unavailable on cpu / float32: switched off for this test"):
        select_backend(torch.device("cpu"), torch.float32, "flex")


def test_flex_availability_is_explained():
    assert flex_backend.available("cpu", torch.float64) is None
    assert "float32/float64" in flex_backend.available("cpu", torch.float16)
    assert sdpa_backend.available("cpu", torch.int64) is not None


def test_float64_inputs_stay_float64():
    tokens = make_layout(3, 4, 6, 5, "membership")
    q, k, v = make_qkv(2, tokens.length, 2, 8, torch.float64, "cpu")
    ref = reference(q, k, v, rule.dense_allowed(tokens, ON))
    for backend in ("sdpa", "flex"):
        out = masked_joint_attention(q, k, v, tokens, ON, backend)
        assert out.dtype == torch.float64
        assert (out - ref).abs().max().item() < 1e-12, backend


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_compiled_flux_transformer_traces_through_the_reference_backends(backend, small_flux_transformer):
    """With the phase set prepared, torch.compile(fullgraph=True) sees no graph break and matches eager."""
    from threedis.engine.processor import AttentionCall
    from threedis.kernels.attention import prepare_attention

    model, args = small_flux_transformer
    tokens = TokenLayout.build(rule.box_regions([(0.0, 0.0, 0.7, 0.6), (0.4, 0.3, 1.0, 1.0)], 4, 5), chunk=5)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        prepare_attention(tokens, ON, "cpu", torch.float32, backend)
        call = {"threedis": AttentionCall(tokens, ON, backend)}
        out = compiled(**args, joint_attention_kwargs=call)[0]
        torch.testing.assert_close(out, model(**args, joint_attention_kwargs=call)[0], rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
