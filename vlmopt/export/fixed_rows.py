"""Layout-reading LLM nodes bound to the export's one-image-per-row layout (HalfV's in-LLM cut).

HalfV's cut inside the language model (``gf.halfv_keep``) and its layer inactivity
(``gf.halfv_active_rows``) read the prompt's :class:`~vlmopt.graph.layout.VisualLayout` for static
per-row counts and loop over the rows in Python, so ``torch.export`` would fix the batch size. An
export fixes the image size, and these graphs one image per row, so every row holds the same number
of visual tokens; :func:`bind_visual_rows` swaps each such node for a batched function of the same
result that takes those counts as ints:

* :func:`halfv_keep_rows`: fixed-k ``TopK`` of the relevance (the anchors), ``vlmopt::kcenter_select``
  (unrolled fixed-k farthest-point picks), ``ScatterElements`` of the kept flags, and
  :func:`compact_slots` (``CumSum`` + ``ScatterElements``: the kept slots, ascending) — no ``TopK``
  with a data-sized K, so TensorRT's parser reads it;
* :func:`halfv_active_rows_fixed`: :func:`compact_slots` of the non-visual rows.

The exporter checks the bound graph against the pipeline graph on its example prompt
(:func:`vlmopt.export.graphs.build_graphs`), and the runtime refuses a prompt whose rows do not hold
one image each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, fx

from vlmopt.export.errors import ExportError
from vlmopt.graph import functions as gf
from vlmopt.graph.layout import VisualLayout


def compact_slots(flags: Tensor, out_len: int) -> Tensor:
    """[B, out_len] ascending slots of the True entries of ``flags`` [B, S], right-aligned and
    left-padded with -1 (``gf.right_aligned`` for rows of at most ``out_len`` Trues), built from a
    cumulative count and a scatter instead of a sort."""
    batch, seq = flags.shape
    counts = flags.long().sum(1, keepdim=True)
    target = flags.long().cumsum(1) - 1 + (out_len - counts)  # the slot's place in its right-aligned row
    target = torch.where(flags, target, torch.full_like(target, out_len))  # dropped slots go to a spare column
    slots = torch.arange(seq, device=flags.device).expand(batch, seq)
    out = torch.full((batch, out_len + 1), -1, dtype=torch.long, device=flags.device)
    return out.scatter(1, target, slots)[:, :out_len]


def halfv_keep_rows(relevance: Tensor, states: Tensor | None, span: Tensor, count: int, budget: int, anchors: int) -> Tensor:
    """``gf.halfv_keep`` for rows that each hold ``count`` visual tokens in ``span`` [B, S]: keep
    ``budget`` of them, the top ``anchors`` by ``relevance`` [B, S] and the rest by k-center coverage
    of ``states`` [B, S, D]; returns [B, S - count + budget] kept slots, ascending."""
    batch, seq = span.shape
    visual = gf.right_aligned(span, count)  # [B, count]: fixed K = count
    chosen = relevance.gather(1, visual).topk(anchors, dim=1).indices if anchors else visual.new_zeros(batch, 0)
    if anchors < budget:
        marked = torch.zeros_like(visual, dtype=torch.bool).scatter(1, chosen, True)
        row_states = states.gather(1, visual[..., None].expand(-1, -1, states.shape[-1]))
        picks = torch.ops.vlmopt.kcenter_select(row_states, torch.ones_like(marked), marked, budget - anchors)
        chosen = torch.cat([chosen, picks], dim=1)
    flags = (~span).scatter(1, visual.gather(1, chosen), True)
    return compact_slots(flags, seq - count + budget)


def halfv_active_rows_fixed(span: Tensor, count: int) -> Tensor:
    """``gf.halfv_active_rows`` for rows that each hold ``count`` visual tokens in ``span`` [B, S]:
    [B, S - count] ascending slots of the other rows."""
    return compact_slots(~span, span.shape[1] - count)


def _one_row(per_row: int) -> VisualLayout:
    return VisualLayout(batch=1, seq_len=per_row, rows=(0,), counts=(per_row,), grids=None)


def _bind_keep(node: fx.Node, per_row: int) -> tuple[Callable, tuple]:
    relevance, states, span, _, current, keep, anchor_frac = node.args
    layout = _one_row(per_row)
    count = gf._visual_per_row(layout, current)[0]
    budget = min(gf._row_budgets(layout, keep)[0], count)
    anchors = budget if states is None else min(budget, int(anchor_frac * budget))
    return halfv_keep_rows, (relevance, states, span, count, budget, anchors)


def _bind_active(node: fx.Node, per_row: int) -> tuple[Callable, tuple]:
    span, _, current = node.args
    return halfv_active_rows_fixed, (span, gf._visual_per_row(_one_row(per_row), current)[0])


#: LLM-side functions that read the layout, and how each is bound to ``per_row`` visual tokens a row.
ROW_BOUND_FUNCTIONS: dict[Callable, Callable[[fx.Node, int], tuple[Callable, tuple]]] = {
    gf.halfv_keep: _bind_keep,
    gf.halfv_active_rows: _bind_active,
}


def bind_visual_rows(module: fx.GraphModule, per_row: int) -> list[str]:
    """Swap every :data:`ROW_BOUND_FUNCTIONS` node of ``module`` (an LLM graph) for its batched form
    with ``per_row`` visual tokens in every row, and drop the ``layout`` input; returns their names."""
    bound = []
    for node in list(module.graph.nodes):
        binder = ROW_BOUND_FUNCTIONS.get(node.target) if node.op == "call_function" else None
        if binder is None:
            continue
        if per_row < 1:
            raise ExportError(f"{node.name} cuts the visual tokens, but the export's image reaches the LLM with {per_row} tokens")
        node.target, node.args = binder(node, per_row)
        bound.append(node.name)
    for node in list(module.graph.nodes):
        if node.op == "placeholder" and node.target == "layout":
            if node.users:
                raise ExportError(f"LLM nodes {[u.name for u in node.users]} still read the VisualLayout after binding")
            module.graph.erase_node(node)
    module.recompile()
    return bound
