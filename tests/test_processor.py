"""MaskedFluxAttnProcessor inside a tiny FluxTransformer2DModel, against diffusers' own processor.

Reference: diffusers' stock FluxAttnProcessor given the rule's dense boolean mask
as `attention_mask` (FluxAttention.forward passes it through, and the native
backend hands it to SDPA). That is diffusers' code for every step around the
attention, so a slip in our re-implementation of projections, norms, RoPE,
concatenation order or output projections shows up as a mismatch. The dense mask
itself is checked against a brute-force evaluation of SPEC's table in test_rule.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxAttention  # noqa: E402

from threedis.engine.processor import AttentionCall, MaskedFluxAttnProcessor, install_processors  # noqa: E402
from threedis.kernels import rule  # noqa: E402
from threedis.kernels.rule import Phases, RuleError, TokenLayout  # noqa: E402

ON = Phases(i2i=True, i2t=True, t2i=True, t2t=True)
LATER = Phases(i2i=False, i2t=True, t2i=True, t2t=True)
GRID = (4, 3)
CHUNK = 5
BOXES = [(0.0, 0.0, 0.7, 0.6), (0.4, 0.3, 1.0, 1.0)]  # overlapping; some cells outside both


def tiny_transformer(seed: int = 0, dtype: torch.dtype = torch.float64) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    return model.to(dtype).eval()


def inputs(num_instances: int, grid=GRID, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    text_len = CHUNK * (num_instances + 1)
    img_ids = torch.zeros(h * w, 3)
    img_ids[:, 1] = torch.arange(h).repeat_interleave(w)
    img_ids[:, 2] = torch.arange(w).repeat(h)
    return dict(
        hidden_states=torch.randn(2, h * w, 8, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(2, text_len, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(2, 32, generator=g).to(dtype),
        timestep=torch.tensor([0.7, 0.3], dtype=dtype),
        guidance=torch.tensor([3.5, 3.5], dtype=dtype),
        img_ids=img_ids,
        txt_ids=torch.zeros(text_len, 3),
        return_dict=False,
    )


def layout(boxes=BOXES, grid=GRID, order: bool = True) -> TokenLayout:
    regions = rule.box_regions(boxes, *grid)
    return TokenLayout.build(regions, chunk=CHUNK, order=rule.membership_order(regions) if order else None)


def run(model, args: dict, **joint) -> torch.Tensor:
    with torch.no_grad():
        return model(**args, joint_attention_kwargs=joint or None)[0]


def masked_pair(dtype=torch.float64):
    stock = tiny_transformer(dtype=dtype)
    ours = copy.deepcopy(stock)
    install_processors(ours)
    return stock, ours


def test_install_sets_every_flux_attention():
    model = tiny_transformer()
    install_processors(model)
    attns = [m for m in model.modules() if isinstance(m, FluxAttention)]
    assert len(attns) == 2  # one double-stream, one single-stream block
    assert all(isinstance(m.processor, MaskedFluxAttnProcessor) for m in attns)
    with pytest.raises(TypeError, match="FluxAttention"):
        install_processors(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_unmasked_matches_stock(dtype, tol):
    stock, ours = masked_pair(dtype)
    args = inputs(2, dtype=dtype)
    want = run(stock, args)
    tokens = layout()
    calls = ({}, {"threedis": None}, {"threedis": AttentionCall(None, None)}, {"threedis": AttentionCall(tokens, None)})
    for joint in calls:
        got = run(ours, args, **joint)
        diff = (got - want).abs().max().item()
        print(f"{dtype} {list(joint)}: max diff {diff:.3e}")
        assert diff < tol


@pytest.mark.parametrize("backend", ["sdpa", "flex", "auto"])
def test_masked_matches_stock_processor_with_dense_mask(backend):
    stock, ours = masked_pair()
    args = inputs(len(BOXES))
    tokens = layout()
    unmasked = run(stock, args)
    for phases in (ON, LATER, Phases(i2i=False, i2t=False, t2i=True, t2t=False)):
        want = run(stock, args, attention_mask=rule.dense_allowed(tokens, phases))
        got = run(ours, args, threedis=AttentionCall(tokens, phases, backend))
        diff = (got - want).abs().max().item()
        effect = (want - unmasked).abs().max().item()
        print(f"{backend} {phases}: max diff {diff:.3e}, mask effect {effect:.3e}")
        assert effect > 1e-5  # the mask matters here, so a dropped `threedis` kwarg would be caught
        assert diff < 1e-10


def test_fused_projections_match_unfused_stock():
    stock, ours = masked_pair()
    ours.fuse_qkv_projections()
    assert all(m.fused_projections for m in ours.modules() if isinstance(m, FluxAttention))
    args = inputs(len(BOXES))
    tokens = layout()
    assert (run(ours, args) - run(stock, args)).abs().max().item() < 1e-12
    want = run(stock, args, attention_mask=rule.dense_allowed(tokens, ON))
    got = run(ours, args, threedis=AttentionCall(tokens, ON, "sdpa"))
    assert (got - want).abs().max().item() < 1e-10


def test_explicit_attention_mask_matches_stock_and_conflicts_with_threedis():
    stock, ours = masked_pair()
    args = inputs(len(BOXES))
    tokens = layout()
    mask = rule.dense_allowed(tokens, LATER)
    want = run(stock, args, attention_mask=mask)
    assert (run(ours, args, attention_mask=mask) - want).abs().max().item() < 1e-12
    with pytest.raises(RuleError, match="cannot be combined"):
        run(ours, args, attention_mask=mask, threedis=AttentionCall(tokens, ON))


def test_layout_that_does_not_fit_the_sequence_is_a_clear_error():
    _, ours = masked_pair()
    args = inputs(len(BOXES))
    wrong_grid = layout(grid=(3, 3))
    with pytest.raises(RuleError, match="sequence length mismatch"):
        run(ours, args, threedis=AttentionCall(wrong_grid, ON))


def test_two_transformers_with_different_layouts_do_not_share_state():
    """Alternating calls on two models with two layouts give the same outputs as separate runs."""
    boxes_b = [(0.1, 0.2, 0.5, 0.9), (0.5, 0.0, 1.0, 0.5), (0.0, 0.0, 0.3, 0.3)]
    grid_b = (3, 5)
    calls = [(ON, "flex"), (LATER, "flex"), (ON, "sdpa"), (None, "auto")]

    def fresh():
        a, b = tiny_transformer(seed=0), tiny_transformer(seed=1)
        install_processors(a)
        install_processors(b)
        return (a, layout(), inputs(2, seed=0)), (b, layout(boxes_b, grid_b, order=False), inputs(3, grid_b, seed=1))

    def step(entry, phases, backend):
        model, tokens, args = entry
        return run(model, args, threedis=AttentionCall(tokens, phases, backend))

    a, b = fresh()
    alone_a = [step(a, *c) for c in calls]
    alone_b = [step(b, *c) for c in calls]
    a, b = fresh()
    for i, c in enumerate(calls):
        assert torch.equal(step(a, *c), alone_a[i]), i
        assert torch.equal(step(b, *c), alone_b[i]), i
    # Truly concurrent: both models in their own threads at once, sharing nothing but the process.
    fresh_a, fresh_b = fresh()
    results: dict[str, list] = {}
    start = threading.Barrier(2)

    def worker(name, entry):
        start.wait()
        results[name] = [step(entry, *c) for c in calls * 2]

    threads = [threading.Thread(target=worker, args=item) for item in (("a", fresh_a), ("b", fresh_b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(torch.equal(got, want) for got, want in zip(results["a"], alone_a * 2))
    assert all(torch.equal(got, want) for got, want in zip(results["b"], alone_b * 2))
    assert len(results["a"]) == len(results["b"]) == 2 * len(calls)
    # the layouts' caches hold only their own tables
    assert all(key[4] == a[1].length for key in a[1].cache if key[:2] == ("flex", "block_mask"))
    assert all(key[4] == b[1].length for key in b[1].cache if key[:2] == ("flex", "block_mask"))
