"""Python functions that pipeline-graph nodes call.

Each reads static planning data (a :class:`~vlmopt.graph.layout.VisualLayout`, ints) and calls
``vlmopt::`` ops with plain ints, so shapes stay static for ``torch.export`` and ONNX. The tracer
keeps every function here as one ``call_function`` node (``autowrap_modules``), so graphs and their
diffs read at the level of these names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vlmopt.graph.layout import VisualLayout, keep_count, pooled_grid

if TYPE_CHECKING:
    from torch import fx

ops = torch.ops.vlmopt


def keep_last(hidden: Tensor, logits_to_keep: int) -> Tensor:
    """The last ``logits_to_keep`` positions of ``hidden`` [B, S, D] (all of them for 0), as HF does."""
    if logits_to_keep == 0:
        return hidden
    return hidden[:, -logits_to_keep:, :]


def layout_keep(layout: VisualLayout, keep_ratio: float | None, num_tokens: int | None) -> VisualLayout:
    """The layout after keeping a fixed number of grid tokens of every visual input (structural kept)."""
    kept = (len(s) + keep_count(c, keep_ratio, num_tokens) for s, c in zip(layout.structural, layout.grid_counts))
    return layout.with_counts(tuple(kept))


def layout_grid(layout: VisualLayout) -> VisualLayout:
    """The layout of the grid tokens alone (each input's structural tokens left out)."""
    return layout.grid_only()


def layout_with_leading(kept: VisualLayout, layout: VisualLayout) -> VisualLayout:
    """``kept`` (a pruned grid-only layout) with ``layout``'s structural tokens back, in front."""
    return kept.with_leading_of(layout)


def grid_index(tokens: Tensor, layout: VisualLayout) -> Tensor:
    """[T_grid] indices of the grid tokens among the visual ``tokens`` [T, D] (structural tokens skipped)."""
    parts, offset = [], 0
    for index, count in enumerate(layout.counts):
        parts.append(torch.tensor(layout.grid_indices(index), dtype=torch.long, device=tokens.device) + offset)
        offset += count
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=tokens.device)


def keep_with_leading(keep: Tensor, grid: Tensor, layout: VisualLayout, kept: VisualLayout) -> Tensor:
    """[T'] indices into the [T] visual tokens: each input's structural tokens, then its kept grid tokens.

    ``keep`` [sum(kept.counts)] indexes the grid tokens, ``grid`` [T_grid] maps them to [T].
    """
    parts, offset, start = [], 0, 0
    for structural, count, budget in zip(layout.structural, layout.counts, kept.counts):
        parts += [torch.tensor(structural, dtype=torch.long, device=keep.device) + offset, grid[keep[start : start + budget]]]
        offset, start = offset + count, start + budget
    return torch.cat(parts) if parts else keep


def tokens_with_leading(tokens: Tensor, kept_tokens: Tensor, layout: VisualLayout, kept: VisualLayout) -> Tensor:
    """[T', D]: each input's structural rows of ``tokens`` [T, D], then its rows of ``kept_tokens``."""
    parts, offset, start = [], 0, 0
    for structural, count, budget in zip(layout.structural, layout.counts, kept.counts):
        rows = torch.tensor(structural, dtype=torch.long, device=tokens.device) + offset
        parts += [tokens.index_select(0, rows), kept_tokens[start : start + budget]]
        offset, start = offset + count, start + budget
    return torch.cat(parts) if parts else kept_tokens


def layout_pool(layout: VisualLayout, keep_ratio: float) -> VisualLayout:
    """The layout after spatial pooling of every frame's grid (structural tokens kept)."""
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




def visual_features_at(embeds: Tensor, features: Tensor, positions: Tensor, part: int) -> Tensor:
    """[B, S, D]: zeros shaped like ``embeds`` [B, S, D] with part ``part`` of the visual ``features``
    [T, D·n] (channels ``[part·D, (part + 1)·D)``) at their flat slots ``positions`` [T]: features a
    model adds to the hidden states of a decoder layer at the visual tokens (DeepStack)."""
    dim = embeds.shape[-1]
    return ops.merge_visual(torch.zeros_like(embeds), features[:, part * dim : (part + 1) * dim], positions)


def split_heads(x: Tensor, head_dim: int) -> Tensor:
    """[B, S, heads, head_dim] view of a projection ``x`` [B, S, heads·head_dim] (for per-head norms)."""
    return x.view(*x.shape[:-1], -1, head_dim)


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


def compact_slots(flags: Tensor, out_len: int) -> Tensor:
    """[B, out_len] ascending slots of the True entries of ``flags`` [B, S], right-aligned and
    left-padded with -1 (:func:`right_aligned` for rows of at most ``out_len`` Trues), built from a
    cumulative count and a scatter instead of a sort (no data-sized ``TopK`` in an export)."""
    batch, seq = flags.shape
    counts = flags.long().sum(1, keepdim=True)
    target = flags.long().cumsum(1) - 1 + (out_len - counts)  # the slot's place in its right-aligned row
    target = torch.where(flags, target, torch.full_like(target, out_len))  # dropped slots go to a spare column
    slots = torch.arange(seq, device=flags.device).expand(batch, seq)
    out = torch.full((batch, out_len + 1), -1, dtype=torch.long, device=flags.device)
    return out.scatter(1, target, slots)[:, :out_len]


def grid_positions(positions: Tensor, layout: VisualLayout) -> Tensor:
    """The slots [T_grid] of the grid (non-structural) tokens among ``positions`` [T] (the visual span a
    pass inside the LLM may prune: structural tokens stay outside it)."""
    return positions.index_select(0, grid_index(positions, layout))


def gather_optional(x: Tensor | None, index: Tensor, batch_dim: int, seq_dim: int) -> Tensor | None:
    """``vlmopt::gather_sequence`` of a sequence input the graph may run without (None stays None)."""
    return None if x is None else ops.gather_sequence(x, index, batch_dim, seq_dim)


def gather_for(node: fx.Node) -> Callable[..., Tensor | None]:
    """What a pass inserts to gather the sequence value ``node`` (an ``fx.Node``): the op, or
    :func:`gather_optional` for an optional graph input (an extra mask input a text prompt may lack)."""
    return gather_optional if node.op == "placeholder" and node.args else ops.gather_sequence.default
