"""Run the decoder layers on a subset of the tokens, and put the rest through unchanged.

Token elision (ReGATE's ``elide=True``): the tokens a training step does not need skip every
decoder layer. They are gathered out before layer 0 (hidden states, cos/sin, and the 4-D attention
masks rebuilt from the gathered 2-D mask, so no kept token attends to an elided one), and after the
last layer each elided token's hidden state is its layer-0 input (the residual stream with every
layer's update skipped), scattered back into the full sequence, so the final norm, the LM head and
the loss see the original ``[B, S]`` layout with the original labels.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from vlmopt.graph import functions as gf
from vlmopt.graph.edit import GraphEditor


def elision_index(answer: Tensor, active: Tensor) -> Tensor:
    """[B, K] int64 positions of the tokens the decoder must compute, ascending, right-aligned and
    left-padded with -1 (``vlmopt::gather_sequence``'s convention).

    ``answer`` and ``active`` are target-aligned [B, S] bool masks: target ``i`` is predicted from
    token ``i-1``. A token is elided only when it is an answer token and the next target is an
    inactive answer token: its prediction is out of the loss, and it is no context for the rest
    either, as elision means. Every other token is computed (the last token of an answer span stays
    as context for later turns), so with every answer token active nothing is elided.
    """
    size = answer.shape[0]
    pad = active.new_zeros((size, 1))
    next_active = torch.cat([active[:, 1:], pad], dim=1)
    next_answer = torch.cat([answer[:, 1:], pad], dim=1)
    keep = ~(answer & next_answer & ~next_active)
    return gf.right_aligned(keep, int(keep.sum(1).max()))


def scatter_sequence(full: Tensor, kept: Tensor, index: Tensor) -> Tensor:
    """``full`` [B, S, D] with row ``b``'s slots ``index[b]`` replaced by ``kept`` [B, K, D] (slots -1
    skipped); differentiable in both."""
    size, length, width = full.shape
    slots = torch.where(index < 0, length, index)  # padding writes into a spare column, dropped below
    padded = torch.cat([full, full.new_zeros((size, 1, width))], dim=1)
    out = padded.scatter(1, slots[:, :, None].expand(-1, -1, width), kept.to(full.dtype))
    return out[:, :length]


def elide_decoder(editor: GraphEditor, index: fx.Node, layers: list[fx.Node], after: fx.Node) -> None:
    """Make ``layers`` (the decoder-layer nodes, in order) compute only the tokens of ``index``
    ([B, K], inserted at ``after``, which must follow every input of layer 0).

    Every sequence value the layers read is gathered once: the hidden states, each layer's own cos/sin
    (one pair per rope kind), and every sequence input of their 4-D masks (the 2-D mask, and any extra
    mask input such as bidirectional block ids), from which the masks are rebuilt.
    """
    first, last = layers[0], layers[-1]
    hidden = editor.input_of(first, "hidden_states")
    chain = editor.chain(after)
    gathered: dict[fx.Node, fx.Node] = {}

    def gather(node: fx.Node) -> fx.Node:
        if node not in gathered:
            gathered[node] = chain(
                torch.ops.vlmopt.gather_sequence.default, node, index, 0, 1,
                role="elide_gather", stage="llm", name=f"{node.name}_elided", meta={"seq_dim": (0, 1)},
            )
        return gathered[node]

    gather(hidden)
    for layer in layers:
        for value in editor.input_of(layer, "position_embeddings"):
            gather(value)
    masks = {}
    for layer in layers:
        mask = editor.input_of(layer, "attention_mask")
        if mask in masks:
            continue
        embeds = editor.input_of(mask, "embeds")
        for value in mask.all_input_nodes:
            if value is not embeds and value.meta.get("seq_dim"):
                gather(value)
        rebuilt = editor.copy_node(mask, after=chain.cursor, replace=gathered)
        editor.set_input(rebuilt, "embeds", gathered[hidden])
        chain.cursor = masks[mask] = rebuilt
    for layer in layers:
        editor.set_input(layer, "attention_mask", masks[editor.input_of(layer, "attention_mask")])
        cos, sin = editor.input_of(layer, "position_embeddings")
        editor.set_input(layer, "position_embeddings", (gathered[cos], gathered[sin]))
    editor.set_input(first, "hidden_states", gathered[hidden])
    # other sequence values added between the layers (DeepStack's visual features) follow the same index
    order = editor.order()
    between = [n for n in editor.graph.nodes if order[first] < order[n] < order[last] and n.meta.get("role") != "decoder_layer"]
    for node in between:
        for value in node.all_input_nodes:
            if order[value] < order[first] and value.meta.get("seq_dim") and value not in gathered:
                dims = value.meta["seq_dim"]
                gathered[value] = chain(
                    torch.ops.vlmopt.gather_sequence.default, value, index, dims[0], dims[1],
                    role="elide_gather", stage="llm", name=f"{value.name}_elided", meta={"seq_dim": dims},
                )
            if value in gathered:
                node.replace_input_with(value, gathered[value])
    scattered = editor.insert(last, scatter_sequence, (hidden, last, index), role="elide_scatter", stage="llm", name="elide_scatter")
    editor.replace_uses(last, scattered, after=scattered)
