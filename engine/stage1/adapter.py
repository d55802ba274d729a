"""The MIGC-style layout adapter of 3DIS stage 1 (SPEC section 6), as plain modules.

Why these exact attribute names: the authors' released `layout_adapter.ckpt` is a
flat state dict keyed `<layer>.attn2.processor.migc.<sub key>`; our modules carry
the same sub keys and shapes so that file loads unchanged (strictly). The names
(`ea`, `la`, `sac.cbam2.ChannelGate.mlp.1`, `pos_net.linears_position.4`, ...) are
the release's; the code is ours. Per adapter layer with C image channels and text
width D (768 for CLIP-L):

    ea   enhance attention    to_q [C,C]  to_k/to_v [C,D]  to_out.0 [C,C]+[C]   (8 heads)
    la   layout attention     to_q/to_k/to_v [C,C]  to_out.0 [C,C]+[C]          (8 heads)
    norm LayerNorm(C)
    sac  shading aggregation  conv2 [1,C,1,1]+[1]; cbam2 over 30 phase slots
    pos_net  box Fourier (64) -> 512 -> 512 -> D MLP with SiLU
    gamma    [1], output gate tanh(gamma)

The adapter processes one conditional image at a time (batch 1): the pipeline
renders a single layout per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from threedis.engine.errors import UserError

__all__ = [
    "ADAPTER_HEADS",
    "BOX_HIDDEN",
    "FOURIER_FREQS",
    "FOURIER_TEMPERATURE",
    "MAX_ADAPTER_INSTANCES",
    "NUM_PHASE_SLOTS",
    "BoxEncoder",
    "Cbam",
    "HeadAttention",
    "LayoutAdapter",
    "ShadingAggregator",
    "fourier_box_embedding",
]

FOURIER_FREQS = 8  # frequencies 100^(k/8), k = 0..7
FOURIER_TEMPERATURE = 100.0
BOX_HIDDEN = 512  # hidden width of the box MLP in the release
ADAPTER_HEADS = 8
NUM_PHASE_SLOTS = 30  # 29 instance slots (padded with a null map) + 1 template
MAX_ADAPTER_INSTANCES = NUM_PHASE_SLOTS - 1


def fourier_box_embedding(boxes: torch.Tensor, num_freqs: int = FOURIER_FREQS,
                          temperature: float = FOURIER_TEMPERATURE) -> torch.Tensor:
    """Fourier features of boxes given as (x0, x1, y0, y1): [..., 4] -> [..., 8 * num_freqs].

    Layout (the release's): for each frequency f_k = temperature^(k/num_freqs), the four
    sin(f_k * b) values, then the four cos(f_k * b) values. Computed in at least float32
    whatever the model dtype, since sin(56 * x) in fp16 loses most of its digits.
    """
    b = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
    freqs = temperature ** (torch.arange(num_freqs, device=b.device, dtype=b.dtype) / num_freqs)
    angles = freqs[:, None] * b[..., None, :]  # [..., F, 4]
    feats = torch.stack([angles.sin(), angles.cos()], dim=-2)  # [..., F, 2, 4]
    return feats.flatten(-3)  # [..., F * 2 * 4]


class BoxEncoder(nn.Module):
    """Box -> one context token (the release's `pos_net`)."""

    def __init__(self, out_dim: int, hidden: int = BOX_HIDDEN, num_freqs: int = FOURIER_FREQS):
        super().__init__()
        self.num_freqs = num_freqs
        self.linears_position = nn.Sequential(
            nn.Linear(num_freqs * 2 * 4, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        # boxes: [N, 4] as (x0, x1, y0, y1) -> [N, out_dim]
        w = self.linears_position[0].weight
        return self.linears_position(fourier_box_embedding(boxes, self.num_freqs).to(w.dtype))


class HeadAttention(nn.Module):
    """Multi-head attention with bias-free q/k/v and a biased output projection (`to_out.0`)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = ADAPTER_HEADS):
        super().__init__()
        context_dim = query_dim if context_dim is None else context_dim
        if query_dim % heads:
            raise ValueError(f"adapter width {query_dim} is not divisible by {heads} heads")
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim)])

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # [B, H, n, D]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B or 1, L, C]; context: [B, S, Dc]; mask: bool [L, S], True = may attend
        context = x if context is None else context
        q = self._split(self.to_q(x))
        k = self._split(self.to_k(context))
        v = self._split(self.to_v(context))
        if q.shape[0] != k.shape[0]:
            q = q.expand(k.shape[0], -1, -1, -1)  # one query image against many contexts
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, L, D]
        out = out.transpose(1, 2).flatten(2)  # [B, L, C]
        return self.to_out[0](out)


class _ChannelGate(nn.Module):
    """CBAM channel gate: a shared MLP over spatial avg and max pools, sigmoid, multiply."""

    def __init__(self, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, channels), nn.ReLU(),
                                 nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, K, h, w]
        att = self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * torch.sigmoid(att)[:, :, None, None]


class _SpatialConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=7, padding=3, bias=False)


class _SpatialGate(nn.Module):
    """CBAM spatial gate: 7x7 conv over the channel max and mean maps, sigmoid, multiply."""

    def __init__(self):
        super().__init__()
        self.spatial = _SpatialConv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)  # [B, 2, h, w]
        return x * torch.sigmoid(self.spatial.conv(pooled))


class Cbam(nn.Module):
    """Channel then spatial gating (reduction ratio 1), over the phase-slot axis."""

    def __init__(self, channels: int):
        super().__init__()
        self.ChannelGate = _ChannelGate(channels)  # noqa: N815 - the release's key name
        self.SpatialGate = _SpatialGate()  # noqa: N815

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SpatialGate(self.ChannelGate(x))


class ShadingAggregator(nn.Module):
    """Mixes per-instance shadings and the layout template with per-pixel softmax weights (`sac`).

    Why the padding and permutation: the gate network sees a fixed 30 slots; unused
    instance slots hold the 1x1-conv response of a zero map (the conv bias), and the
    instance slots are shuffled so no slot position means a particular instance.
    """

    def __init__(self, channels: int, slots: int = NUM_PHASE_SLOTS):
        super().__init__()
        self.slots = slots
        self.conv2 = nn.Conv2d(channels, 1, kernel_size=1)
        self.cbam2 = Cbam(slots)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], perm: torch.Tensor) -> torch.Tensor:
        # x: [P, HW, C] with P = N instance shadings + 1 template (last); perm: int64 [slots - 1]
        p, hw, c = x.shape
        n = p - 1
        if n > self.slots - 1:
            raise UserError(f"the layout adapter handles at most {self.slots - 1} instances, got {n}; "
                            f"remove instances or turn the adapter off (migc_steps=0)")
        h, w = grid
        scale = F.linear(x, self.conv2.weight.view(1, c), self.conv2.bias)  # [P, HW, 1]
        scale = scale.view(p, h, w)
        null = self.conv2.bias.view(1, 1, 1).expand(self.slots - 1 - n, h, w)  # response to a zero map
        inst = torch.cat([scale[:n], null], dim=0)[perm]  # [slots - 1, h, w], shuffled
        gated = self.cbam2(torch.cat([inst, scale[n:]], dim=0)[None])[0]  # [slots, h, w]
        inv = torch.argsort(perm)
        logits = torch.cat([gated[:-1][inv[:n]], gated[-1:]], dim=0).view(p, hw, 1)
        weights = logits.softmax(dim=0)  # [P, HW, 1]
        return (x * weights).sum(dim=0, keepdim=True)  # [1, HW, C]


class LayoutAdapter(nn.Module):
    """One adapter layer (`migc`): enhance attention + layout attention + shading aggregation."""

    def __init__(self, channels: int, context_dim: int, box_hidden: int = BOX_HIDDEN,
                 heads: int = ADAPTER_HEADS):
        super().__init__()
        self.ea = HeadAttention(channels, context_dim, heads)
        self.la = HeadAttention(channels, None, heads)
        self.norm = nn.LayerNorm(channels)
        self.sac = ShadingAggregator(channels)
        self.pos_net = BoxEncoder(context_dim, box_hidden)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        global_out: torch.Tensor,
        image_tokens: torch.Tensor,
        pooled: torch.Tensor,
        boxes: torch.Tensor,
        inst_masks: torch.Tensor,
        layout_allowed: torch.Tensor,
        grid: tuple[int, int],
        perm: torch.Tensor,
    ) -> torch.Tensor:
        """global_out, image_tokens: [1, HW, C] (the global cross-attention output and the
        attention input); pooled: [N, D]; boxes: [N, 4] as (x0, x1, y0, y1);
        inst_masks: [N, HW] soft box masks; layout_allowed: bool [HW, HW]. -> [1, HW, C]."""
        context = torch.stack([pooled, self.pos_net(boxes)], dim=1)  # [N, 2, D]
        shading = self.ea(self.norm(image_tokens), context)  # [N, HW, C]
        shading = shading * inst_masks[..., None]
        template = self.la(image_tokens, mask=layout_allowed)  # [1, HW, C]
        mixed = self.sac(torch.cat([shading, template], dim=0), grid, perm)  # [1, HW, C]
        return global_out + mixed * torch.tanh(self.gamma)
