"""Export-friendly stand-ins for HF leaf modules that ``torch.export`` cannot trace as they are.

Qwen2.5-VL's vision attention splits the sequence with ``cu_seqlens.tolist()`` (data dependent) and
runs one attention call per window. For a fixed image grid the windows are known at export time, so
the stand-in runs the same block as **one** SDPA call with a constant block-diagonal mask built from
segment ids (``seg[i] == seg[j]``), reusing the block's own submodules (same weights, same order of
operations up to the attention's summation order).

:func:`make_exportable` swaps these stand-ins into a vision GraphModule (on the GraphModule itself:
the HF model is never touched). Adding a stand-in is one entry in :data:`STAND_INS`.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn


def segment_ids(cu_seqlens: Tensor) -> Tensor:
    """[S] int64 id of the attention segment of every row, from cumulative lengths [n + 1]."""
    bounds = [int(v) for v in cu_seqlens.tolist()]
    ids = [index for index, (lo, hi) in enumerate(pairwise(bounds)) for _ in range(hi - lo)]
    return torch.tensor(ids, dtype=torch.long)


class QwenVisionBlockForExport(nn.Module):
    """A ``Qwen2_5_VLVisionBlock`` with its attention segments fixed: one masked SDPA call.

    hidden [S, D] → [S, D]; ``position_embeddings`` (cos, sin) [S, Dh]; the ``cu_seqlens`` argument
    of the original call is ignored (its value is baked into ``segments`` [S]).
    """

    def __init__(self, block: nn.Module, cu_seqlens: Tensor) -> None:
        super().__init__()
        self.block = block
        self.register_buffer("segments", segment_ids(cu_seqlens), persistent=False)

    def forward(self, hidden: Tensor, cu_seqlens: Any = None, position_embeddings=None, **kwargs) -> Tensor:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            apply_rotary_pos_emb_vision,
        )

        block, attn = self.block, self.block.attn
        seq = hidden.shape[0]
        normed = block.norm1(hidden)
        q, k, v = attn.qkv(normed).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, S, Dh]
        mask = (self.segments[:, None] == self.segments[None, :])[None, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        out = attn.proj(out.transpose(1, 2).reshape(seq, -1))
        hidden = hidden + out
        return hidden + block.mlp(block.norm2(hidden))


def _qwen_block(module: nn.Module, node: fx.Node, constants: dict[str, Any]) -> nn.Module:
    source = node.kwargs.get("cu_seqlens")
    if not isinstance(source, fx.Node) or source.op != "placeholder" or source.target not in constants:
        raise ValueError(f"{node.name}: cu_seqlens must be a planned input bound to a constant for export")
    return QwenVisionBlockForExport(module, constants[source.target])


#: HF class name → factory(module, node, constants) of its export stand-in.
STAND_INS: dict[str, Callable[[nn.Module, fx.Node, dict[str, Any]], nn.Module]] = {
    "Qwen2_5_VLVisionBlock": _qwen_block,
}


def make_exportable(module: fx.GraphModule, constants: dict[str, Any]) -> list[str]:
    """Point every call of a module in :data:`STAND_INS` at its stand-in; returns the swapped targets.

    ``constants`` are the values the graph's planned inputs are bound to for export.
    """
    swapped = []
    for node in module.graph.nodes:
        if node.op != "call_module":
            continue
        leaf = module.get_submodule(node.target)
        factory = STAND_INS.get(type(leaf).__name__)
        if factory is None:
            continue
        name = "export_" + str(node.target).replace(".", "_")
        module.add_submodule(name, factory(leaf, node, constants))
        swapped.append(str(node.target))
        node.target = name
    module.recompile()
    return swapped
