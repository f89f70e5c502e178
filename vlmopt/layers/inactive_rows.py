"""A decoder-layer stand-in that updates only some rows (HalfV's "layer inactivity" on LLaVA).

From HalfV's saturation layer on, LLaVA's visual tokens are frozen: they issue no query, get no
attention output and no MLP update, so their hidden states pass through unchanged, while their keys
and values (computed from the frozen states by each layer's own norm and projections) still serve
the text tokens and fill the KV cache. :class:`InactiveRowsLayer` wraps one HF decoder layer (sharing
its weights; read through the family's decoder-layer view) and computes exactly that: norm + K/V
projections for every row, and queries, attention, output projection and MLP for the active rows
only — the compute of the frozen rows is skipped, not computed and discarded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from vlmopt.adapters.layer_view import DecoderLayerView


class InactiveRowsLayer(nn.Module):
    """Runs one decoder layer for the rows ``active`` [B, A] of ``hidden`` [B, S, D] (ascending slots,
    -1 = padding); every other row passes through unchanged but still contributes its keys/values.

    ``attention_mask`` is the 2-D mask [B, past + S] of the layer's segment; attention is causal by
    slot, and every active query also sees its own key (a padding query then stays finite).
    """

    def __init__(self, layer: nn.Module, view: DecoderLayerView) -> None:
        super().__init__()
        view.check(layer)
        self.layer = layer
        self.view = view

    def forward(self, hidden: Tensor, active: Tensor, attention_mask: Tensor, cos: Tensor, sin: Tensor, cache) -> Tensor:
        layer, view = self.layer, self.view
        batch, seq, width = hidden.shape
        slots = active.clamp_min(0)
        layer_idx = view.layer_index(layer)

        def rows(x: Tensor) -> Tensor:
            return torch.gather(x, 1, slots[..., None].expand(-1, -1, x.shape[-1]))

        normed = view.part(layer, "input_norm")(hidden)
        keys, values = view.heads(layer, "k_proj", normed), view.heads(layer, "v_proj", normed)
        queries = view.heads(layer, "q_proj", rows(normed))
        queries, keys = view.rotate(queries, rows(cos), rows(sin)), view.rotate(keys, cos, sin)
        past = 0
        if cache is not None:
            past = cache.get_seq_length(layer_idx)
            keys, values = cache.update(keys, values, layer_idx)
        groups = queries.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        key_slots = torch.arange(keys.shape[2], device=hidden.device)
        query_slots = (slots + past)[..., None]
        allowed = (key_slots <= query_slots) & attention_mask.bool()[:, None, :]
        allowed = allowed | (key_slots == query_slots)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed[:, None], scale=view.scale(layer))
        updated = view.after_attention(layer, rows(hidden), out.transpose(1, 2).reshape(batch, slots.shape[1], -1))
        updated = view.feed_forward(layer, updated)
        # Padding slots (-1) write into a spare row that is dropped, so they never clobber a real row.
        target = torch.where(active >= 0, active, seq)[..., None].expand(-1, -1, width)
        spare = torch.cat([hidden, hidden.new_zeros(batch, 1, width)], dim=1)
        return spare.scatter(1, target, updated)[:, :seq]
