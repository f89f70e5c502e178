"""Python functions that pipeline-graph nodes call.

Each reads static planning data (a :class:`~vlmopt.graph.layout.VisualLayout`, ints) and calls
``vlmopt::`` ops with plain ints, so shapes stay static for ``torch.export`` and ONNX. The tracer
keeps every function here as one ``call_function`` node (``autowrap_modules``), so graphs and their
diffs read at the level of these names.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmopt.graph.layout import VisualLayout, keep_count, pooled_grid

ops = torch.ops.vlmopt


def window_permute(x: Tensor, window_index: Tensor, unit: int) -> Tensor:
    """Reorder Qwen2.5-VL patch rows into window order (groups of ``unit`` patches move together)."""
    seq = x.shape[0]
    return x.reshape(seq // unit, unit, -1)[window_index, :, :].reshape(seq, -1)


def keep_last(hidden: Tensor, logits_to_keep: int) -> Tensor:
    """The last ``logits_to_keep`` positions of ``hidden`` [B, S, D] (all of them for 0), as HF does."""
    if logits_to_keep == 0:
        return hidden
    return hidden[:, -logits_to_keep:, :]


def layout_keep(layout: VisualLayout, keep_ratio: float | None, num_tokens: int | None) -> VisualLayout:
    """The layout after keeping a fixed number of grid tokens of every visual input (leading kept)."""
    kept = (lead + keep_count(c, keep_ratio, num_tokens) for lead, c in zip(layout.leading, layout.grid_counts))
    return layout.with_counts(tuple(kept))


def layout_grid(layout: VisualLayout) -> VisualLayout:
    """The layout of the grid tokens alone (each input's leading tokens left out)."""
    return layout.grid_only()


def layout_with_leading(kept: VisualLayout, layout: VisualLayout) -> VisualLayout:
    """``kept`` (a pruned grid-only layout) with ``layout``'s leading tokens back in front."""
    return kept.with_leading_of(layout)


def grid_index(tokens: Tensor, layout: VisualLayout) -> Tensor:
    """[T_grid] indices of the grid tokens among the visual ``tokens`` [T, D] (leading tokens skipped)."""
    parts, offset = [], 0
    for lead, count in zip(layout.leading, layout.counts):
        parts.append(torch.arange(offset + lead, offset + count, device=tokens.device))
        offset += count
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=tokens.device)


def keep_with_leading(keep: Tensor, grid: Tensor, layout: VisualLayout, kept: VisualLayout) -> Tensor:
    """[T'] indices into the [T] visual tokens: each input's leading tokens, then its kept grid tokens.

    ``keep`` [sum(kept.counts)] indexes the grid tokens, ``grid`` [T_grid] maps them to [T].
    """
    parts, offset, start = [], 0, 0
    for lead, count, budget in zip(layout.leading, layout.counts, kept.counts):
        parts += [torch.arange(offset, offset + lead, device=keep.device), grid[keep[start : start + budget]]]
        offset, start = offset + count, start + budget
    return torch.cat(parts) if parts else keep


def tokens_with_leading(tokens: Tensor, kept_tokens: Tensor, layout: VisualLayout, kept: VisualLayout) -> Tensor:
    """[T', D]: each input's leading rows of ``tokens`` [T, D], then its rows of ``kept_tokens``."""
    parts, offset, start = [], 0, 0
    for lead, count, budget in zip(layout.leading, layout.counts, kept.counts):
        parts += [tokens[offset : offset + lead], kept_tokens[start : start + budget]]
        offset, start = offset + count, start + budget
    return torch.cat(parts) if parts else kept_tokens


def layout_pool(layout: VisualLayout, keep_ratio: float) -> VisualLayout:
    """The layout after spatial pooling of every frame's grid (leading tokens kept)."""
    if layout.grids is None:
        raise ValueError("layout_pool needs token grids; an earlier pass already pruned the visual tokens")
    return layout.with_grids(tuple(pooled_grid(g, keep_ratio) for g in layout.grids))


def random_scores(like: Tensor, layout: VisualLayout, seed: int) -> Tensor:
    """[T] seeded uniform scores; see :mod:`vlmopt.ops.random_scores`."""
    return ops.random_scores(like, list(layout.counts), seed)


def select_topk(scores: Tensor, layout: VisualLayout, kept: VisualLayout) -> Tensor:
    """[T'] ascending global indices of each input's top-``kept.counts[i]`` scores."""
    return ops.topk_indices(scores, list(layout.counts), list(kept.counts))


def pool_tokens(x: Tensor, layout: VisualLayout, pooled: VisualLayout) -> tuple[Tensor, Tensor]:
    """(pooled tokens [T', D], global index of each pooled token's top-left token [T'])."""
    out_grids = [d for _, h, w in pooled.grids for d in (h, w)]
    return ops.pool_tokens(x, layout.flat_grids, out_grids)


def pruned_length(layout: VisualLayout, kept: VisualLayout) -> int:
    """Length of the longest row once the dropped visual tokens leave the sequence."""
    before, after = layout.tokens_per_row(), kept.tokens_per_row()
    return max(layout.seq_len - b + a for b, a in zip(before, after))


def sequence_keep_index(
    visual_positions: Tensor, kept_positions: Tensor, layout: VisualLayout, kept: VisualLayout
) -> Tensor:
    """[B, S'] sequence positions that survive pruning; see :mod:`vlmopt.ops.sequence_keep_index`."""
    return ops.sequence_keep_index(
        visual_positions, kept_positions, layout.batch, layout.seq_len, pruned_length(layout, kept)
    )


def received_attention(q: Tensor, k: Tensor, num_heads: int, scale: float) -> Tensor:
    """[N, S] attention each token receives, from q, k [N, S, H·D]; see :mod:`vlmopt.ops.received_attention`."""
    return ops.received_attention(q, k, num_heads, scale)


def qwen_vision_qk(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """(q, k), each [P, heads, head_dim], of a Qwen2.5-VL vision block from its fused projection ``qkv``
    [P, 3·D], with the 2-D rotary applied as the block applies it."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    q, k, _ = qkv.reshape(qkv.shape[0], 3, num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    return apply_rotary_pos_emb_vision(q, k, cos, sin)


def hiprune_select(
    object_scores: Tensor, deep_scores: Tensor, layout: VisualLayout, kept: VisualLayout, alpha: float
) -> tuple[Tensor, Tensor]:
    """(kept indices [T'], kinds [T']) — HiPrune's selection with ``round(alpha · N' / 5)`` anchors."""
    anchors = [min(budget, int(alpha * budget / 5 + 0.5)) for budget in kept.counts]
    return ops.hiprune_select(object_scores, deep_scores, layout.flat_grids, list(kept.counts), anchors)


def decoder_qk(q: Tensor, k: Tensor, cos: Tensor | None, sin: Tensor | None, head_dim: int) -> tuple[Tensor, Tensor]:
    """(q [B, H, S, D], k [B, H_kv, S, D]) from a decoder layer's projections [B, S, ··D], with the
    layer's rotary embedding (cos, sin [B, S, D]; 1-D RoPE or M-RoPE) applied when given."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, seq = q.shape[:2]
    q = q.view(batch, seq, -1, head_dim).transpose(1, 2)
    k = k.view(batch, seq, -1, head_dim).transpose(1, 2)
    if cos is None:
        return q, k
    return apply_rotary_pos_emb(q, k, cos, sin)


def vision_received_attention(
    q: Tensor, k: Tensor, layout: VisualLayout, num_heads: int, scale: float, leading: int, merge: int,
    score=ops.received_attention,
) -> Tensor:
    """[T_grid] attention each grid visual token receives in one vision block, in the tower's order.

    ``q``, ``k`` hold the block's queries and keys of every frame (see
    :class:`vlmopt.adapters.base.VisionQK`): attention is dense per image or frame (windows
    ignored, inputs never mixed), every query votes, the ``leading`` columns (CLS) are dropped,
    and the scores of the ``merge`` tower tokens of one visual token are averaged. Frames of one size
    go through ``score`` (the op; training passes its differentiable reference) together.
    """
    sizes = [(t, leading + h * w * merge) for t, h, w in layout.grids]
    total = sum(t * size for t, size in sizes)
    q, k = q.reshape(total, -1), k.reshape(total, -1)
    scores, offset, first = [], 0, 0
    while first < len(sizes):
        size, last = sizes[first][1], first
        while last < len(sizes) and sizes[last][1] == size:
            last += 1
        frames = sum(t for t, _ in sizes[first:last])
        block = slice(offset, offset + frames * size)
        received = score(q[block].reshape(frames, size, -1), k[block].reshape(frames, size, -1), num_heads, scale)
        scores.append(received[:, leading:].reshape(-1))
        offset, first = offset + frames * size, last
    flat = torch.cat(scores)
    return flat if merge == 1 else flat.reshape(-1, merge).mean(-1)


def visual_span_mask(embeds: Tensor, positions: Tensor) -> Tensor:
    """[B, S] bool: True at the flat slots ``positions`` [T] (``b * S + s``) of the visual tokens in
    a sequence shaped like ``embeds`` [B, S, D]."""
    batch, seq = embeds.shape[:2]
    flags = torch.zeros(batch * seq, dtype=torch.bool, device=embeds.device)
    return flags.index_fill(0, positions, True).view(batch, seq)


def right_aligned(flags: Tensor, out_len: int) -> Tensor:
    """[B, out_len] ascending slots of the True entries of ``flags`` [B, S], each row right-aligned
    and left-padded with -1 (static shape: ``out_len`` ≥ every row's count)."""
    seq = flags.shape[1]
    key = flags.long() * seq + torch.arange(seq, device=flags.device)
    values, index = torch.topk(key, out_len, dim=1, largest=True, sorted=True)
    values, index = values.flip(1), index.flip(1)
    return torch.where(values >= seq, index, torch.full_like(index, -1))


def _row_budgets(layout: VisualLayout, keep: float) -> list[int]:
    budgets = [0] * layout.batch
    for row, count in zip(layout.rows, layout.counts):
        budgets[row] += keep_count(count, keep, None)
    return budgets


def _visual_per_row(layout: VisualLayout, current: float) -> list[int]:
    """Visual tokens per row once ``current`` of each input's visual tokens remain (static counts)."""
    return _row_budgets(layout, current) if current < 1.0 else list(layout.tokens_per_row())


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
    counts = _visual_per_row(layout, current)
    budgets = [min(b, c) for b, c in zip(_row_budgets(layout, keep), counts)]
    seq = span.shape[1]
    rows = []
    for b, (count, budget) in enumerate(zip(counts, budgets)):
        flags = ~span[b]
        if count:
            visual = right_aligned(span[b : b + 1], count)[0]  # [count] ascending slots of the span
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
    return right_aligned(torch.stack(rows), out_len)


def halfv_active_rows(span: Tensor, layout: VisualLayout, current: float) -> Tensor:
    """[B, A] ascending slots of the non-visual rows of ``span`` [B, S] (left-padded with -1), where
    ``current`` of each input's visual tokens remain (static counts)."""
    counts = _visual_per_row(layout, current)
    return right_aligned(~span, span.shape[1] - min(counts))
