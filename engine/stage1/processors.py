"""UNet attention processors for stage 1: plain, refined shader, and the layout adapter.

The pipeline passes `cross_attention_kwargs={"stage1": Stage1Call(...)}` to the UNet;
every attention layer gets it. Self-attention (`attn1`) ignores it. Cross-attention
(`attn2`) on the conditional row (the last batch row; the first is the negative
prompt under classifier-free guidance) does one of:

- the layout adapter (`AdapterProcessor`, in the 7 adapter layers while the step is
  below `migc_steps`): global cross-attention + aggregated instance shading;
- the refined shader elsewhere while the step is below `refine_steps`: per-instance
  cross-attentions mixed with the global one by a per-token softmax over logits
  (1 for global, 10 x box mask for instance i);
- plain cross-attention with the global prompt: no instances, or a step past both.

The per-step switches follow the authors' rule: in a layer, the adapter while it is
on, else the shader while it is on, else plain (their `MIGCsteps` / `NaiveFuserSteps`).

Why per-call state travels in the kwargs rather than on the processors: two
pipelines (or two renders) sharing one UNet never see each other's masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from threedis.engine.stage1.adapter import MAX_ADAPTER_INSTANCES, LayoutAdapter
from threedis.engine.stage1.masks import BoxMasks

__all__ = [
    "ADAPTER_LAYERS",
    "AdapterProcessor",
    "CrossProcessor",
    "RenderState",
    "SelfProcessor",
    "Stage1Call",
    "install_processors",
    "make_adapters",
]

# The transformer blocks whose cross-attention carries an adapter in the release
# (keys `<layer>.attn2.processor.migc.*`): C = 1280 for mid and up_blocks.1, 640 for up_blocks.2.
ADAPTER_LAYERS: tuple[str, ...] = (
    "mid_block.attentions.0.transformer_blocks.0",
    *(f"up_blocks.1.attentions.{i}.transformer_blocks.0" for i in range(3)),
    *(f"up_blocks.2.attentions.{i}.transformer_blocks.0" for i in range(3)),
)


@dataclass
class RenderState:
    """What one render's cross-attention needs; built once per render by the pipeline."""

    instance_embeds: torch.Tensor  # [N, 77, D] CLIP last hidden states per instance
    pooled: torch.Tensor  # [N, D] CLIP pooled (final-norm EOS) output per instance
    boxes: torch.Tensor  # [N, 4] (x0, x1, y0, y1), float32
    masks: BoxMasks
    generator: torch.Generator  # draws the adapter's slot permutations

    @property
    def num_instances(self) -> int:
        return int(self.instance_embeds.shape[0])


@dataclass(frozen=True)
class Stage1Call:
    """Per-step message to every attention processor: which of the adapter and the shader are on this step."""

    render: RenderState | None
    adapter_on: bool = False
    refine_on: bool = True  # refined shader where the adapter is not running; False = plain cross-attention


def _heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, attn.heads, c // attn.heads).transpose(1, 2)  # [B, H, n, d]


def _attend(attn: Attention, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    # q: [B, H, L, d] (already projected), context: [B', S, D] -> [B', H, L, d]
    k, v = _heads(attn, attn.to_k(context)), _heads(attn, attn.to_v(context))
    if q.shape[0] != k.shape[0]:
        q = q.expand(k.shape[0], -1, -1, -1)
    return F.scaled_dot_product_attention(q, k, v, scale=attn.scale)


def _project(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    # out: [B, H, L, d] -> [B, L, C]
    out = out.transpose(1, 2).flatten(2)
    return attn.to_out[1](attn.to_out[0](out))


def _check_plain(attn: Attention, hidden_states: torch.Tensor) -> None:
    if hidden_states.ndim != 3 or attn.residual_connection or attn.norm_cross or attn.group_norm is not None:
        raise NotImplementedError("stage-1 processors expect SD-style transformer-block cross-attention")


class SelfProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor, accepting (and ignoring) the stage-1 kwarg."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 stage1: Stage1Call | None = None) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class CrossProcessor:
    """Cross-attention outside the adapter layers: plain or refined shader."""

    def _adapter(self) -> LayoutAdapter | None:
        return None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 stage1: Stage1Call | None = None) -> torch.Tensor:
        # hidden_states: [B, L, C]; encoder_hidden_states: [B, 77, D] (negative, global)
        _check_plain(attn, hidden_states)
        if encoder_hidden_states is None or attention_mask is not None:
            raise NotImplementedError("stage-1 cross-attention expects text context and no attention mask")
        q = _heads(attn, attn.to_q(hidden_states))  # [B, H, L, d]
        out = _attend(attn, q, encoder_hidden_states)  # [B, H, L, d]
        render = stage1.render if stage1 is not None else None
        if render is None or render.num_instances == 0:
            return _project(attn, out)
        adapter = self._adapter()
        if adapter is not None and stage1.adapter_on:
            return self._adapt(attn, adapter, hidden_states, out, render)
        if not stage1.refine_on:
            return _project(attn, out)
        return _project(attn, self._shade(attn, q, out, render))

    @staticmethod
    def _shade(attn: Attention, q: torch.Tensor, out: torch.Tensor, render: RenderState) -> torch.Tensor:
        """Refined shader on the last (conditional) row; mixing before `to_out` is exact
        because the weights sum to one and `to_out` is affine."""
        weights = render.masks.at(q.shape[2]).weights[:, None]  # [N + 1, 1, L, 1]
        mixed = out[-1:] * weights[0]
        for i in range(render.num_instances):  # one instance at a time keeps peak memory flat
            mixed = mixed + _attend(attn, q[-1:], render.instance_embeds[i:i + 1]) * weights[i + 1]
        return torch.cat([out[:-1], mixed], dim=0)

    @staticmethod
    def _adapt(attn: Attention, adapter: LayoutAdapter, hidden_states: torch.Tensor, out: torch.Tensor,
               render: RenderState) -> torch.Tensor:
        glob = _project(attn, out)  # [B, L, C]
        grid = render.masks.at(hidden_states.shape[1])
        perm = torch.randperm(MAX_ADAPTER_INSTANCES, generator=render.generator).to(hidden_states.device)
        cond = adapter(glob[-1:], hidden_states[-1:], render.pooled, render.boxes.to(hidden_states.device),
                       grid.inst, grid.layout_allowed, grid.grid, perm)
        return torch.cat([glob[:-1], cond], dim=0)


class AdapterProcessor(CrossProcessor, nn.Module):
    """Cross-attention of an adapter layer. An nn.Module, so that once set on `attn2` its
    weights appear in the UNet's state dict as `<layer>.attn2.processor.migc.*`."""

    def __init__(self, adapter: LayoutAdapter):
        nn.Module.__init__(self)
        self.migc = adapter

    def _adapter(self) -> LayoutAdapter | None:
        return self.migc

    __call__ = CrossProcessor.__call__


def make_adapters(unet: nn.Module, layers: tuple[str, ...] = ADAPTER_LAYERS,
                  context_dim: int | None = None) -> dict[str, LayoutAdapter]:
    """Fresh adapter layers sized from the UNet: C from each layer's attn2, D from the text width."""
    d = int(context_dim if context_dim is not None else unet.config.cross_attention_dim)
    return {layer: LayoutAdapter(unet.get_submodule(f"{layer}.attn2").to_q.in_features, d) for layer in layers}


def install_processors(unet: nn.Module, adapters: dict[str, LayoutAdapter] | None = None) -> dict[str, nn.Module]:
    """Set stage-1 processors on every attention of `unet`; returns the adapter processors by layer."""
    adapters = dict(adapters or {})
    procs: dict[str, object] = {}
    installed: dict[str, nn.Module] = {}
    for name in unet.attn_processors:
        layer, _, kind = name.removesuffix(".processor").rpartition(".")
        if kind == "attn2" and layer in adapters:
            installed[layer] = procs[name] = AdapterProcessor(adapters.pop(layer))
        elif kind == "attn2":
            procs[name] = CrossProcessor()
        else:
            procs[name] = SelfProcessor()
    if adapters:
        raise ValueError(f"adapter layers not found in the UNet: {sorted(adapters)}")
    unet.set_attn_processor(procs)
    return installed
