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


def qwen_vision_qk(attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k), each [P, heads, head_dim], of a Qwen vision block's attention ``attn`` on its normalised
    input ``hidden`` [P, D]: the fused ``qkv`` projection split and the 2-D rotary applied as the block
    applies it (Qwen2.5-VL's and Qwen3-VL's ``apply_rotary_pos_emb_vision`` are the same function;
    ``tests/training/test_qwen3vl.py`` checks the scores against Qwen3-VL's eager attention)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    q, k, _ = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    return apply_rotary_pos_emb_vision(q, k, cos, sin)


def _qwen_received(attn: nn.Module, hidden: torch.Tensor, rotary, grid_thw: torch.Tensor, window_index: torch.Tensor, merge_unit: int) -> list[torch.Tensor]:
    """Per image, [merged tokens] received attention of one Qwen2.5-VL or Qwen3-VL vision block in raster
    order: HiPrune's score (the column means of the block's attention, dense over each image, windows
    ignored, every query voting; the op's differentiable reference), averaged over each merge group.
    ``hidden`` [P, D] and ``rotary`` (cos, sin) are in the tower's order (Qwen2.5-VL: windows; Qwen3-VL:
    raster), whose merge groups ``window_index`` maps to raster order."""
    from vlmopt.ops.received_attention import reference

    q, k = qwen_vision_qk(attn, hidden, *rotary)
    sizes = (grid_thw.prod(-1)).tolist()  # patches per image (single images: t = 1)
    pooled = torch.cat([
        reference(qi.flatten(1)[None], ki.flatten(1)[None], attn.num_heads, attn.scaling)[0].reshape(-1, merge_unit).mean(-1)
        for qi, ki in zip(q.split(sizes), k.split(sizes))
    ])
    raster = torch.empty_like(pooled).index_put((window_index,), pooled)
    return list(raster.split([size // merge_unit for size in sizes]))


def qwen_windows(model, grid_thw: torch.Tensor) -> dict:
    """What :func:`tower_guide_loss` needs to read a Qwen tower's blocks: Qwen2.5-VL's run in window
    order; Qwen3-VL's tower has no windows, its blocks run in raster order (the identity index)."""
    visual = model.model.visual
    if not hasattr(visual, "window_size"):
        merged = int((grid_thw.prod(-1) // visual.spatial_merge_unit).sum())
        return {"grid_thw": grid_thw, "window_index": torch.arange(merged), "merge_unit": visual.spatial_merge_unit}
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
    return {"grid_thw": grid_thw, "window_index": index, "merge_unit": visual.spatial_merge_unit}


def tower_guide_loss(tap: AttentionTap, samples: list[tasks.Sample], cell: int, goal: float = 1.0, qwen: dict | None = None) -> torch.Tensor:
    """``max(0, log(goal) - log(share))`` with ``share`` the part of the received attention (HiPrune's
    score: mean over heads and all queries) that falls on object tokens, averaged over the tapped
    layers and images. CLIP: token 0 is CLS, patch tokens follow in raster order. Qwen2.5-VL and Qwen3-VL
    (``qwen`` = :func:`qwen_windows` of the batch): merged tokens, scores as :func:`_qwen_received`
    computes them (single images only)."""
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
    patches, heads = hidden.shape[0], attn.num_heads
    q, k = qwen_vision_qk(attn, hidden, *rotary)
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
