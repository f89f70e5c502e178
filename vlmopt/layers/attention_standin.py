"""Attention replaced inside the decoder layers: a stand-in layer around the layer's own modules.

A pass that changes *how a layer attends* (APB-V's anchor/passing-block attention, distributed
decoding) swaps every ``decoder_layer`` node of a stage graph for an :class:`AttentionStandIn`: a
module that holds the HF decoder layer (sharing its weights, never copying or patching it) and
runs, through the family's decoder-layer view, its input norm, its q/k/v projections (and per-head
q/k norms), the rotary embedding the graph already computed (``cos``/``sin``, 1-D RoPE or M-RoPE),
then an *attention module* the pass supplies, then the layer's own output projection (and its norm),
residuals, feed-forward norms and MLP. The attention module receives the rotated queries, keys and
values and the KV cache and calls the ``vlmopt::`` ops (its ``extra_repr`` names them).

Why a stand-in rather than a level-2 ``torch.export`` graph of each layer with its
``aten.scaled_dot_product_attention`` node replaced: the replacement is not one op for one op. APB-V
splits the sequence per host, compresses blocks with the question's queries, merges partial results
by log-sum-exp and fills the KV cache with per-host parts; decoding merges per-host attentions. That
is data-dependent Python around several ops, which an exported ATen graph would have to express as
static graph surgery, and the exported layer would need re-exporting per sequence length (or
dynamic shapes) and its own cache handling. The stand-in keeps the level-1 pipeline graph as the one
place passes edit, reuses the HF modules exactly (the projections, norms and MLP are the same
objects), and shows in ``vlmopt diff`` as the decoder-layer nodes replaced by stand-in nodes. It is
the same road as :mod:`vlmopt.layers.inactive_rows` (HalfV's frozen rows). The user's model and
its config are never touched: only the compiled stage graphs hold the stand-ins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from torch import fx

    from vlmopt.adapters.layer_view import DecoderLayerView
    from vlmopt.graph.edit import GraphEditor


class AttentionStandIn(nn.Module):
    """One decoder layer with its attention computed by ``attention`` (see the module docstring).

    ``attention(q, k, v, cache=, layer_idx=, scale=, context=)`` gets q [B, H, S, D], k and v
    [B, H_kv, S, D] (RoPE applied to q and k) and returns the attention output [B, H, S, D]; it owns
    the KV cache update (it may store keys in any layout its decode counterpart reads back).
    """

    def __init__(self, layer: nn.Module, attention: nn.Module, view: DecoderLayerView) -> None:
        super().__init__()
        view.check(layer)
        self.layer = layer
        self.attention = attention
        self.view = view

    def forward(self, hidden: Tensor, cos: Tensor, sin: Tensor, cache, context=None) -> Tensor:
        layer, view = self.layer, self.view
        batch, seq, _ = hidden.shape
        normed = view.part(layer, "input_norm")(hidden)
        q, k, v = (view.heads(layer, role, normed) for role in ("q_proj", "k_proj", "v_proj"))
        q, k = view.rotate(q, cos, sin), view.rotate(k, cos, sin)
        out = self.attention(q, k, v, cache=cache, layer_idx=view.layer_index(layer), scale=view.scale(layer), context=context)
        hidden = view.after_attention(layer, hidden, out.transpose(1, 2).reshape(batch, seq, -1))
        return view.feed_forward(layer, hidden)


def replace_attention(
    editor: GraphEditor, view: DecoderLayerView, make_attention: Callable[[int], nn.Module], context: fx.Node | None,
    prefix: str,
) -> list[fx.Node]:
    """Swap every decoder layer of ``editor``'s graph for an :class:`AttentionStandIn` (reading the layer
    through ``view``) whose attention is ``make_attention(layer_index)``; each stand-in also reads ``context`` (a node, e.g. a per-batch
    plan or the 2-D mask, or None). The stand-ins are submodules ``{prefix}.{index}`` and nodes
    ``{prefix}_layer_{index}`` with role ``decoder_layer`` and the layer's index; mask nodes left
    without users are removed. Returns the new nodes by layer index."""
    module = editor.module
    layers = sorted(editor.nodes("decoder_layer"), key=lambda n: n.meta["index"])
    replaced = []
    for node in layers:
        index = node.meta["index"]
        target = f"{prefix}.{index}"
        module.add_submodule(target, AttentionStandIn(module.get_submodule(node.target), make_attention(index), view))
        mask = editor.input_of(node, "attention_mask")
        cos, sin = editor.input_of(node, "position_embeddings")
        args = (editor.input_of(node, "hidden_states"), cos, sin, editor.input_of(node, "cache"), context)
        stand_in = editor.insert_module(node, target, args, role="decoder_layer", stage="llm", name=f"{prefix}_layer_{index}")
        stand_in.meta.update(index=index, seq_dim=node.meta.get("seq_dim"))
        node.replace_all_uses_with(stand_in)
        editor.graph.erase_node(node)
        if isinstance(mask, type(stand_in)) and not mask.users:
            editor.graph.erase_node(mask)
        replaced.append(stand_in)
    return replaced
