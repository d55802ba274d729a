"""Stage-1 adapter pieces against references written here from the method's description."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from threedis.engine.errors import UserError
from threedis.engine.stage1.adapter import LayoutAdapter, ShadingAggregator, fourier_box_embedding
from threedis.engine.stage1.masks import BoxMasks, rasterize_boxes, shader_weights, to_xxyy
from threedis.engine.stage1.processors import CrossProcessor, RenderState, Stage1Call


def test_fourier_matches_formula():
    boxes = torch.tensor([[0.1, 0.7, 0.25, 0.9], [0.0, 1.0, 0.5, 0.5]], dtype=torch.float64)
    got = fourier_box_embedding(boxes)
    assert got.shape == (2, 64)
    for n in range(2):
        want = []
        for k in range(8):
            f = 100.0 ** (k / 8)
            want += [math.sin(f * v) for v in boxes[n].tolist()]
            want += [math.cos(f * v) for v in boxes[n].tolist()]
        torch.testing.assert_close(got[n].double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=0)


def test_box_order_is_x0_x1_y0_y1():
    assert to_xxyy([(0.1, 0.2, 0.3, 0.4)])[0].tolist() == pytest.approx([0.1, 0.3, 0.2, 0.4])


@pytest.mark.parametrize("size", [(37, 53), (64, 64)])
def test_rasterize_floors_both_ends(size):
    h, w = size
    boxes = [(0.1, 0.2, 0.55, 0.97), (0.0, 0.0, 1.0, 1.0), (0.333, 0.5, 0.334, 0.52)]
    got = rasterize_boxes(boxes, h, w)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        for r in range(h):
            for c in range(w):
                inside = int(h * y0) <= r < int(h * y1) and int(w * x0) <= c < int(w * x1)
                assert got[i, r, c].item() == float(inside), (i, r, c)


def test_masks_resize_pixels_then_latent_then_grid_once():
    boxes = [(0.1, 0.2, 0.55, 0.9), (0.4, 0.0, 1.0, 0.5)]
    masks = BoxMasks(boxes, 64, 96, "cpu", torch.float32)
    pix = rasterize_boxes(boxes, 64, 96)
    bg = 1 - pix.sum(0, keepdim=True).clamp(max=1)
    lat = F.interpolate(torch.cat([pix, bg])[None], size=(8, 12), mode="bilinear")
    want = F.interpolate(lat, size=(4, 6), mode="bilinear")[0].flatten(1)
    got = masks.at(24)
    assert got.grid == (4, 6)
    torch.testing.assert_close(got.inst, want[:2])
    torch.testing.assert_close(got.background, want[2])
    assert masks.at(24) is got  # cached per grid, not rebuilt per call
    assert masks.grid_for(2) == (1, 2) and masks.grid_for(96) == (8, 12)


def test_layout_allowed_shares_a_phase():
    boxes = [(0.0, 0.0, 0.5, 0.5), (0.25, 0.25, 0.75, 1.0)]
    g = BoxMasks(boxes, 56, 40, "cpu", torch.float32).at(35)  # 7 x 5 grid
    phases = torch.cat([g.inst, g.background[None]])
    allowed = g.layout_allowed
    for p in range(35):
        for q in range(35):
            share = any(phases[k, p] > 0 and phases[k, q] > 0 for k in range(3))
            assert bool(allowed[p, q]) == share
    assert allowed.diagonal().all()


def test_shader_weights_full_cover_by_hand():
    w = shader_weights(torch.ones(1, 5))
    e1, e10 = math.exp(1.0), math.exp(10.0)
    torch.testing.assert_close(w[0], torch.full((5,), e1 / (e1 + e10)))
    torch.testing.assert_close(w[1], torch.full((5,), e10 / (e1 + e10)))


def _render(n: int, d: int, masks: BoxMasks, seed: int = 0) -> RenderState:
    g = torch.Generator().manual_seed(123)
    return RenderState(torch.randn(n, 7, d, generator=g, dtype=torch.float64),
                       torch.randn(n, d, generator=g, dtype=torch.float64),
                       torch.rand(n, 4, generator=g, dtype=torch.float64), masks,
                       torch.Generator().manual_seed(seed))


def test_refined_shader_matches_diffusers_attention_by_hand():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).double().eval()
    hidden = torch.randn(2, 20, 16, dtype=torch.float64)  # 2 rows: negative, conditional; 4 x 5 grid
    context = torch.randn(2, 7, 12, dtype=torch.float64)
    # one instance covering everything: weights are the constants e/(e+e^10), e^10/(e+e^10)
    masks = BoxMasks([(0.0, 0.0, 1.0, 1.0)], 32, 40, "cpu", torch.float64)
    render = _render(1, 12, masks)
    attn.set_processor(AttnProcessor2_0())
    plain = attn(hidden, context)
    inst = attn(hidden[1:], render.instance_embeds)
    e1, e10 = math.exp(1.0), math.exp(10.0)
    want = (e1 * plain[1] + e10 * inst[0]) / (e1 + e10)
    attn.set_processor(CrossProcessor())
    got = attn(hidden, context, stage1=Stage1Call(render))
    torch.testing.assert_close(got[0], plain[0])  # the negative row is untouched
    torch.testing.assert_close(got[1], want)
    # the shader off this step, or no render: plain cross-attention
    torch.testing.assert_close(attn(hidden, context, stage1=Stage1Call(render, refine_on=False)), plain)
    torch.testing.assert_close(attn(hidden, context, stage1=None), plain)


def test_refined_shader_two_partial_boxes():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(1)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).double().eval()
    hidden = torch.randn(1, 20, 16, dtype=torch.float64)  # no guidance: one (conditional) row
    context = torch.randn(1, 7, 12, dtype=torch.float64)
    masks = BoxMasks([(0.0, 0.0, 0.5, 0.75), (0.3, 0.5, 1.0, 1.0)], 32, 40, "cpu", torch.float64)
    render = _render(2, 12, masks)
    attn.set_processor(AttnProcessor2_0())
    outs = [attn(hidden, context)[0]] + [attn(hidden, render.instance_embeds[i:i + 1])[0] for i in range(2)]
    m = masks.at(20).inst
    want = torch.zeros_like(outs[0])
    for p in range(20):
        logits = [1.0, 10.0 * m[0, p].item(), 10.0 * m[1, p].item()]
        z = sum(math.exp(v) for v in logits)
        want[p] = sum(math.exp(v) / z * o[p] for v, o in zip(logits, outs, strict=True))
    attn.set_processor(CrossProcessor())
    torch.testing.assert_close(attn(hidden, context, stage1=Stage1Call(render))[0], want)


# -- the adapter against a literal reference -------------------------------------------------


def _ref_adapter(sd, glob, x, pooled, boxes, inst, bg, grid, perm, heads=8):
    """The adapter computed step by step from SPEC section 6, in float64, one instance at a time."""
    def lin(t, name, bias=True):
        return t @ sd[f"{name}.weight"].T + (sd[f"{name}.bias"] if bias else 0)

    def mha(q_in, kv_in, prefix, allowed=None):
        q = lin(q_in, f"{prefix}.to_q", False)
        k, v = lin(kv_in, f"{prefix}.to_k", False), lin(kv_in, f"{prefix}.to_v", False)
        d = q.shape[-1] // heads
        outs = []
        for h in range(heads):
            s = q[:, h * d:(h + 1) * d] @ k[:, h * d:(h + 1) * d].T / math.sqrt(d)
            if allowed is not None:
                s = s.masked_fill(~allowed, float("-inf"))
            outs.append(s.softmax(-1) @ v[:, h * d:(h + 1) * d])
        return lin(torch.cat(outs, -1), f"{prefix}.to_out.0")

    n, (h, w) = pooled.shape[0], grid
    hw = h * w
    feats = []
    for b in boxes:
        row = []
        for k in range(8):
            f = 100.0 ** (k / 8)
            row += [torch.sin(f * b), torch.cos(f * b)]
        feats.append(torch.cat(row))
    t = torch.stack(feats)
    t = F.silu(lin(t, "pos_net.linears_position.0"))
    t = F.silu(lin(t, "pos_net.linears_position.2"))
    box_tok = lin(t, "pos_net.linears_position.4")
    xn = F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"])
    shading = [mha(xn, torch.stack([pooled[i], box_tok[i]]), "ea") * inst[i][:, None] for i in range(n)]
    phases = torch.cat([inst, bg[None]])
    allowed = torch.zeros(hw, hw, dtype=torch.bool)
    for p in range(hw):
        for q in range(hw):
            allowed[p, q] = bool((phases[:, p] * phases[:, q]).sum() > 0)
    template = mha(x, x, "la", allowed)
    phase_x = shading + [template]
    wconv, bconv = sd["sac.conv2.weight"].view(-1), sd["sac.conv2.bias"]
    maps = [(px @ wconv + bconv).view(h, w) for px in phase_x]
    slots = maps[:n] + [bconv.view(1, 1).expand(h, w)] * (29 - n)
    stack = torch.stack([slots[j] for j in perm.tolist()] + [maps[n]])  # [30, h, w]

    def mlp(v):
        return lin(F.relu(lin(v, "sac.cbam2.ChannelGate.mlp.1")), "sac.cbam2.ChannelGate.mlp.3")

    gate = torch.sigmoid(mlp(stack.mean((1, 2))) + mlp(stack.amax((1, 2))))
    stack = stack * gate[:, None, None]
    pooled_maps = torch.stack([stack.amax(0), stack.mean(0)])[None]
    spatial = torch.sigmoid(F.conv2d(pooled_maps, sd["sac.cbam2.SpatialGate.spatial.conv.weight"], padding=3))[0, 0]
    stack = stack * spatial
    slot_of = {int(p): j for j, p in enumerate(perm.tolist())}
    logits = torch.stack([stack[slot_of[i]] for i in range(n)] + [stack[29]]).view(n + 1, hw)
    wts = logits.softmax(0)
    mixed = sum(wts[k][:, None] * phase_x[k] for k in range(n + 1))
    return glob + mixed * torch.tanh(sd["gamma"])


@pytest.mark.parametrize("n", [1, 3])
def test_adapter_matches_reference(n):
    torch.manual_seed(n)
    c, d, grid = 16, 12, (5, 6)
    adapter = LayoutAdapter(c, d).double().eval()
    for p in adapter.parameters():  # non-trivial values everywhere, gamma included
        p.data.normal_(0, 0.3)
    boxes_xyxy = [(0.0, 0.1, 0.5, 0.7), (0.3, 0.4, 0.9, 1.0), (0.6, 0.0, 1.0, 0.3)][:n]
    g = BoxMasks(boxes_xyxy, 40, 48, "cpu", torch.float64).at(30)
    glob, x = torch.randn(1, 30, c, dtype=torch.float64), torch.randn(1, 30, c, dtype=torch.float64)
    pooled, boxes = torch.randn(n, d, dtype=torch.float64), to_xxyy(boxes_xyxy).double()
    perm = torch.randperm(29, generator=torch.Generator().manual_seed(7))
    got = adapter(glob, x, pooled, boxes, g.inst, g.layout_allowed, grid, perm)
    sd = {k: v.detach() for k, v in adapter.state_dict().items()}
    want = _ref_adapter(sd, glob[0], x[0], pooled, boxes, g.inst, g.background, grid, perm)
    torch.testing.assert_close(got[0], want)


def test_permutation_changes_output_and_comes_from_the_generator():
    torch.manual_seed(0)
    sac = ShadingAggregator(8).double()
    for p in sac.parameters():
        p.data.normal_(0, 0.5)
    x = torch.randn(3, 12, 8, dtype=torch.float64)
    a = sac(x, (3, 4), torch.arange(29))
    b = sac(x, (3, 4), torch.arange(29).flip(0))
    assert not torch.allclose(a, b)  # the slot order matters, so it must be seeded


def test_more_than_29_instances_is_a_user_error():
    sac = ShadingAggregator(8)
    with pytest.raises(UserError, match="at most 29 instances"):
        sac(torch.randn(31, 4, 8), (2, 2), torch.arange(29))


def test_released_rule_has_about_62m_parameters():
    with torch.device("meta"):
        big, small = LayoutAdapter(1280, 768), LayoutAdapter(640, 768)
    total = 4 * sum(p.numel() for p in big.parameters()) + 3 * sum(p.numel() for p in small.parameters())
    assert 61.5e6 < total < 63e6
