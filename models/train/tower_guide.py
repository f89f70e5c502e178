"""The vision-tower guides: the attention HiPrune's layers receive falls on object tokens
(:func:`tower_guide_loss`), and Qwen's relation guide (:func:`neighbour_guide_loss`)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from models.train.hooks import AttentionTap
from models.train.targets import object_cells
from vlmopt.reference import scenes, tasks


def _object_token_mask(sample: tasks.Sample, cell: int, offset: int) -> torch.Tensor:
    """[offset + tokens] 1.0 on the visual tokens (``cell`` px, raster order) an object covers; the
    first ``offset`` entries (CLS) are 0."""
    cells = object_cells(sample, list(range(len(sample.objects[0]))), cell)
    mask = torch.zeros(offset + (sample.masks.shape[1] // cell) * (sample.masks.shape[2] // cell))
    if cells:
        mask[offset + np.concatenate(cells)] = 1.0
    return mask


def _qwen_received(attn: nn.Module, hidden: torch.Tensor, rotary, grid_thw: torch.Tensor, window_index: torch.Tensor, merge_unit: int) -> list[torch.Tensor]:
    """Per image, [merged tokens] received attention of one Qwen2.5-VL vision block in raster order:
    HiPrune's score (:func:`vlmopt.graph.functions.vision_received_attention` on the block's
    :func:`~vlmopt.graph.functions.qwen_vision_qk`, with the op's differentiable reference). ``hidden`` [P, D] and ``rotary`` (cos, sin) are in the tower's window
    order; ``window_index`` maps merge groups to raster order."""
    from vlmopt.graph import functions as gf
    from vlmopt.graph.layout import VisualLayout
    from vlmopt.ops.received_attention import reference

    side = int(merge_unit**0.5)
    grids = tuple((t, h // side, w // side) for t, h, w in grid_thw.tolist())
    layout = VisualLayout.from_grids(len(grids), 1, tuple(range(len(grids))), grids)
    q, k = gf.qwen_vision_qk(attn.qkv(hidden), *rotary, attn.num_heads)
    pooled = gf.vision_received_attention(q, k, layout, attn.num_heads, attn.scaling, 0, merge_unit, score=reference)
    raster = torch.empty_like(pooled).index_put((window_index,), pooled)
    return list(raster.split(list(layout.counts)))


def qwen_windows(model, grid_thw: torch.Tensor) -> dict:
    """What :func:`tower_guide_loss` needs to read a Qwen2.5-VL tower's window-ordered blocks."""
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
    return {"grid_thw": grid_thw, "window_index": index, "merge_unit": visual.spatial_merge_unit}


def tower_guide_loss(tap: AttentionTap, samples: list[tasks.Sample], cell: int, goal: float = 1.0, qwen: dict | None = None) -> torch.Tensor:
    """``max(0, log(goal) - log(share))`` with ``share`` the part of the received attention (HiPrune's
    score: mean over heads and all queries) that falls on object tokens, averaged over the tapped
    layers and images. CLIP: token 0 is CLS, patch tokens follow in raster order. Qwen2.5-VL (``qwen``
    = ``{"grid_thw", "window_index", "merge_unit"}`` of the batch): merged tokens, scores as
    :func:`_qwen_received` computes them (single images only)."""
    from vlmopt.ops.received_attention import reference as received_attention

    masks = [_object_token_mask(s, cell, offset=0 if qwen else 1) for s in samples]
    has_objects = torch.tensor([bool(m.sum() > 0) for m in masks])
    losses = []
    for index, attn in enumerate(tap.modules):
        hidden, rotary = tap.inputs[index]
        if qwen is None:
            received = list(received_attention(attn.q_proj(hidden), attn.k_proj(hidden), attn.num_heads, attn.scale))
        else:
            received = _qwen_received(attn, hidden, rotary, qwen["grid_thw"], qwen["window_index"], qwen["merge_unit"])
        share = torch.stack([(r * m).sum() / r.sum() for r, m in zip(received, masks)])
        losses.append(torch.relu(math.log(goal) - torch.log(share[has_objects] + 1e-6)).mean())
    return torch.stack(losses).mean()


def neighbour_guide_loss(
    attn: nn.Module, hidden: torch.Tensor, rotary, samples: list[tasks.Sample], cell: int, window_index: torch.Tensor, merge_unit: int
) -> torch.Tensor:
    """:attr:`TrainConfig.neighbour_guide_weight`'s loss: mean over object patches and heads of
    ``-log`` the attention mass head ``h`` puts on the patches of the objects ``scenes.DIRECTIONS[h % 4]``
    of its own object (on its own object where none is). ``hidden`` [P, D] is a full-attention Qwen2.5-VL
    vision block's normalised input in window order, ``rotary`` its (cos, sin); ``window_index`` [P /
    merge_unit] maps window order to the batch's merged tokens in raster order (one image per sample,
    each ``cell`` px merged token one token of :func:`object_cells`)."""
    from vlmopt.graph.functions import qwen_vision_qk

    patches, heads = hidden.shape[0], attn.num_heads
    q, k = qwen_vision_qk(attn.qkv(hidden), *rotary, heads)
    where = torch.argsort(window_index)  # raster merged token -> its place in window order
    per_image = patches // merge_unit // len(samples)
    directions = [scenes.DIRECTIONS[h % len(scenes.DIRECTIONS)] for h in range(heads)]
    losses = []
    for i, s in enumerate(samples):
        objs = s.objects[0]
        cells = object_cells(s, list(range(len(objs))), cell)
        rows = lambda tokens: (where[torch.as_tensor(tokens, dtype=torch.long) + i * per_image][:, None] * merge_unit + torch.arange(merge_unit)).reshape(-1)
        first = i * per_image * merge_unit  # windows never mix images: image i's patches are contiguous
        keys = k[first : first + per_image * merge_unit]
        for o, own in enumerate(cells):
            if not len(own):
                continue
            target = torch.zeros(heads, keys.shape[0])
            for h, direction in enumerate(directions):
                there = [c for p, c in enumerate(cells) if p != o and len(c) and scenes.relation(objs[p], objs[o]) == direction]
                target[h, rows(np.concatenate(there) if there else own) - first] = 1.0
            weights = torch.einsum("rhd,khd->rhk", q[rows(own)], keys).mul(attn.scaling).softmax(-1)  # [R, H, keys]
            losses.append(-torch.log((weights * target).sum(-1) + 1e-6).mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())
