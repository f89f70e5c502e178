"""A decoder-layer stand-in that updates only some rows (HalfV's "layer inactivity" on LLaVA).

From HalfV's saturation layer on, LLaVA's visual tokens are frozen: they issue no query, get no
attention output and no MLP update, so their hidden states pass through unchanged, while their keys
and values (computed from the frozen states by each layer's own norm and projections) still serve
the text tokens and fill the KV cache. :class:`InactiveRowsLayer` wraps one HF Llama-style decoder
layer (sharing its weights) and computes exactly that: norm + K/V projections for every row, and
queries, attention, output projection and MLP for the active rows only — the compute of the frozen
rows is skipped, not computed and discarded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x`` [B, H, S, D] with ``cos``/``sin`` [B, S, D] (as Llama applies it)."""
    from transformers.models.llama.modeling_llama import rotate_half

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class InactiveRowsLayer(nn.Module):
    """Runs one decoder layer for the rows ``active`` [B, A] of ``hidden`` [B, S, D] (ascending slots,
    -1 = padding); every other row passes through unchanged but still contributes its keys/values.

    ``attention_mask`` is the 2-D mask [B, past + S] of the layer's segment; attention is causal by
    slot, and every active query also sees its own key (a padding query then stays finite).
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        attention = layer.self_attn
        if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise TypeError(f"{type(layer).__name__}: layer inactivity needs separate q/k/v/o projections")
        self.layer = layer

    def forward(self, hidden: Tensor, active: Tensor, attention_mask: Tensor, cos: Tensor, sin: Tensor, cache) -> Tensor:
        layer, attention = self.layer, self.layer.self_attn
        batch, seq, width = hidden.shape
        head_dim = attention.head_dim
        slots = active.clamp_min(0)

        def rows(x: Tensor) -> Tensor:
            return torch.gather(x, 1, slots[..., None].expand(-1, -1, x.shape[-1]))

        normed = layer.input_layernorm(hidden)
        keys = attention.k_proj(normed).view(batch, seq, -1, head_dim).transpose(1, 2)
        values = attention.v_proj(normed).view(batch, seq, -1, head_dim).transpose(1, 2)
        keys = _rotate(keys, cos, sin)
        queries = attention.q_proj(rows(normed)).view(batch, slots.shape[1], -1, head_dim).transpose(1, 2)
        queries = _rotate(queries, rows(cos), rows(sin))
        past = 0
        if cache is not None:
            past = cache.get_seq_length(attention.layer_idx)
            keys, values = cache.update(keys, values, attention.layer_idx)
        groups = queries.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        key_slots = torch.arange(keys.shape[2], device=hidden.device)
        query_slots = (slots + past)[..., None]
        allowed = (key_slots <= query_slots) & attention_mask.bool()[:, None, :]
        allowed = allowed | (key_slots == query_slots)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed[:, None], scale=attention.scaling)
        updated = rows(hidden) + attention.o_proj(out.transpose(1, 2).reshape(batch, slots.shape[1], -1))
        updated = updated + layer.mlp(layer.post_attention_layernorm(updated))
        # Padding slots (-1) write into a spare row that is dropped, so they never clobber a real row.
        target = torch.where(active >= 0, active, seq)[..., None].expand(-1, -1, width)
        spare = torch.cat([hidden, hidden.new_zeros(batch, 1, width)], dim=1)
        return spare.scatter(1, target, updated)[:, :seq]
