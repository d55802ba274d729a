"""FLUX attention processor that applies the 3DIS rule inside every joint attention.

It reproduces diffusers' stock `FluxAttnProcessor` step for step (projections,
q/k RMS norms, the text stream's added projections, text-first concatenation,
RoPE, output projections) and swaps only the attention call for
`masked_joint_attention`. What to mask arrives per call as the `threedis`
keyword in `joint_attention_kwargs`, so the processor itself holds no state and
one instance can serve every layer of any number of transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention

from threedis.kernels.attention import masked_joint_attention
from threedis.kernels.rule import Phases, RuleError, TokenLayout


@dataclass(frozen=True)
class AttentionCall:
    """What one transformer call should mask: the layout, this step's phases, the backend.

    tokens or phases None means plain attention (no instances, or past the hard-control window).
    """

    tokens: TokenLayout | None
    phases: Phases | None
    backend: str = "auto"


def _projections(attn: FluxAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """q, k, v of the stream (and of the text stream in double blocks), fused or not, like diffusers."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    text = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
            text = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            text = (
                attn.add_q_proj(encoder_hidden_states),
                attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states),
            )
    return query, key, value, text


class MaskedFluxAttnProcessor:
    """Drop-in for diffusers' FluxAttnProcessor (double and single blocks) with the 3DIS mask.

    Stateless: no counters, no caches (those live on the TokenLayout).
    """

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        threedis: AttentionCall | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        query, key, value, text = _projections(attn, hidden_states, encoder_hidden_states)

        # [B, S, H*D] -> [B, S, H, D]
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if text is not None:
            text_q, text_k, text_v = (t.unflatten(-1, (-1, attn.head_dim)) for t in text)
            text_q = attn.norm_added_q(text_q)
            text_k = attn.norm_added_k(text_k)
            # joint sequence, text first: [B, T + HW, H, D]
            query = torch.cat([text_q, query], dim=1)
            key = torch.cat([text_k, key], dim=1)
            value = torch.cat([text_v, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        masked = threedis is not None and threedis.tokens is not None and threedis.phases is not None
        if attention_mask is not None:
            if masked:
                raise RuleError("an explicit attention_mask cannot be combined with the 3DIS mask; pass only one")
            # The stock processor's path with a caller-supplied mask (diffusers' native backend).
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask
            ).transpose(1, 2)
        elif threedis is None:
            out = masked_joint_attention(query, key, value, None, None)
        else:
            out = masked_joint_attention(query, key, value, threedis.tokens, threedis.phases, threedis.backend)
        out = out.flatten(2, 3).to(query.dtype)  # [B, L, H*D]

        if encoder_hidden_states is None:
            return out  # single block: the block applies its own output projection
        text_len = encoder_hidden_states.shape[1]
        text_out, image_out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out


def install_processors(transformer: torch.nn.Module) -> None:
    """Put one shared MaskedFluxAttnProcessor on every FluxAttention of a FluxTransformer2DModel."""
    processor = MaskedFluxAttnProcessor()
    count = 0
    for module in transformer.modules():
        if isinstance(module, FluxAttention):
            module.set_processor(processor)
            count += 1
    if count == 0:
        raise TypeError(f"{type(transformer).__name__} has no FluxAttention modules; expected a FluxTransformer2DModel")
