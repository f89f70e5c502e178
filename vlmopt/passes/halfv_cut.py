"""HalfV's graph functions: which slots survive a cut inside the LLM, which rows stay active, and
their batched forms for export (:class:`~vlmopt.passes.halfv.HalfV` inserts them; ``vlmopt export``
binds them through :meth:`HalfV.export_bindings`).

Budgets are per visual input (rounded half up, at least one token), summed per row, so every
shape is static for a batch layout. An export fixes the image size and one image per row, so the
batched forms take those counts as ints: fixed-k ``TopK`` of the relevance (the anchors),
``vlmopt::kcenter_select`` (unrolled fixed-k farthest-point picks), ``ScatterElements`` of the kept
flags and :func:`~vlmopt.graph.functions.compact_slots` — no ``TopK`` with a data-sized K, so
TensorRT's parser reads them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, fx

from vlmopt.graph import functions as gf
from vlmopt.graph.layout import VisualLayout, keep_count

ops = torch.ops.vlmopt


def row_budgets(layout: VisualLayout, keep: float) -> list[int]:
    """Visual tokens kept per row when each input keeps ``keep`` of its grid tokens."""
    budgets = [0] * layout.batch
    for row, count in zip(layout.rows, layout.grid_counts):
        budgets[row] += keep_count(count, keep, None)
    return budgets


def visual_per_row(layout: VisualLayout, current: float) -> list[int]:
    """Visual (grid) tokens per row once ``current`` of each input's remain (static counts)."""
    if current < 1.0:
        return row_budgets(layout, current)
    per_row = [0] * layout.batch
    for row, count in zip(layout.rows, layout.grid_counts):
        per_row[row] += count
    return per_row


def last_token_relevance(q: Tensor, k: Tensor, span: Tensor, scale: float) -> Tensor:
    """[B, S] how much the last token's queries (``q`` [B, H, S, D]) attend to each key of ``k``
    [B, Hkv, S, D], softmax over the visual ``span`` [B, S] only, mean over heads."""
    return ops.last_token_attention(q[:, :, -1, :], k, span, scale)


def halfv_keep(
    relevance: Tensor, states: Tensor | None, span: Tensor, layout: VisualLayout, current: float, keep: float,
    anchor_frac: float,
) -> Tensor:
    """[B, S'] slots surviving one HalfV cut: every non-visual slot, and per row ``keep`` of its
    visual tokens (counted on ``layout``, summed over the row's inputs): the top ``anchor_frac`` of
    that budget by ``relevance`` [B, S], the rest by k-center coverage of ``states`` [B, S, D]
    (``vlmopt::kcenter_select``; ``states`` None = all by relevance). ``current`` is the keep
    fraction already applied to the visual span (1.0 before any cut), so the row counts are static.
    """
    counts = visual_per_row(layout, current)
    budgets = [min(b, c) for b, c in zip(row_budgets(layout, keep), counts)]
    seq = span.shape[1]
    rows = []
    for b, (count, budget) in enumerate(zip(counts, budgets)):
        flags = ~span[b]
        if count:
            visual = gf.right_aligned(span[b : b + 1], count)[0]  # [count] ascending slots of the span
            anchors = budget if states is None else min(budget, int(anchor_frac * budget))
            chosen = relevance[b].index_select(0, visual).topk(anchors).indices
            if anchors < budget:
                marked = torch.zeros(1, count, dtype=torch.bool, device=span.device).index_fill(1, chosen, True)
                row_states = states[b].index_select(0, visual)[None]
                picks = ops.kcenter_select(row_states, torch.ones_like(marked), marked, budget - anchors)[0]
                chosen = torch.cat([chosen, picks])
            flags = flags.index_fill(0, visual.index_select(0, chosen), True)
        rows.append(flags)
    out_len = seq - min(c - b for c, b in zip(counts, budgets))
    return gf.right_aligned(torch.stack(rows), out_len)


def halfv_active_rows(span: Tensor, layout: VisualLayout, current: float) -> Tensor:
    """[B, A] ascending slots of the non-visual rows of ``span`` [B, S] (left-padded with -1), where
    ``current`` of each input's visual tokens remain (static counts)."""
    counts = visual_per_row(layout, current)
    return gf.right_aligned(~span, span.shape[1] - min(counts))


# ----- batched forms for rows that each hold one image (export) -------------------------------------
def halfv_keep_rows(relevance: Tensor, states: Tensor | None, span: Tensor, count: int, budget: int, anchors: int) -> Tensor:
    """:func:`halfv_keep` for rows that each hold ``count`` visual tokens in ``span`` [B, S]: keep
    ``budget`` of them, the top ``anchors`` by ``relevance`` [B, S] and the rest by k-center coverage
    of ``states`` [B, S, D]; returns [B, S - count + budget] kept slots, ascending."""
    batch, seq = span.shape
    visual = gf.right_aligned(span, count)  # [B, count]: fixed K = count
    chosen = relevance.gather(1, visual).topk(anchors, dim=1).indices if anchors else visual.new_zeros(batch, 0)
    if anchors < budget:
        marked = torch.zeros_like(visual, dtype=torch.bool).scatter(1, chosen, True)
        row_states = states.gather(1, visual[..., None].expand(-1, -1, states.shape[-1]))
        picks = ops.kcenter_select(row_states, torch.ones_like(marked), marked, budget - anchors)
        chosen = torch.cat([chosen, picks], dim=1)
    flags = (~span).scatter(1, visual.gather(1, chosen), True)
    return gf.compact_slots(flags, seq - count + budget)


def halfv_active_rows_fixed(span: Tensor, count: int) -> Tensor:
    """:func:`halfv_active_rows` for rows that each hold ``count`` visual tokens in ``span`` [B, S]:
    [B, S - count] ascending slots of the other rows."""
    return gf.compact_slots(~span, span.shape[1] - count)


def bind_keep(node: fx.Node, row: VisualLayout) -> tuple[Callable, tuple]:
    """The :func:`halfv_keep_rows` call equal to a :func:`halfv_keep` node for rows that each hold the
    visual inputs of ``row`` (a one-row layout: the counts are per input, structural tokens left out)."""
    relevance, states, span, _, current, keep, anchor_frac = node.args
    count = visual_per_row(row, current)[0]
    budget = min(row_budgets(row, keep)[0], count)
    anchors = budget if states is None else min(budget, int(anchor_frac * budget))
    return halfv_keep_rows, (relevance, states, span, count, budget, anchors)


def bind_active(node: fx.Node, row: VisualLayout) -> tuple[Callable, tuple]:
    """The :func:`halfv_active_rows_fixed` call equal to a :func:`halfv_active_rows` node."""
    span, _, current = node.args
    return halfv_active_rows_fixed, (span, visual_per_row(row, current)[0])


#: The layout-reading functions HalfV inserts, and how each is bound to one image per row.
EXPORT_BINDINGS: dict[Callable, Callable[[fx.Node, int], tuple[Callable, tuple]]] = {
    halfv_keep: bind_keep,
    halfv_active_rows: bind_active,
}
