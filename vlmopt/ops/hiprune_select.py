"""``vlmopt::hiprune_select`` — HiPrune's anchor / buffer / register token selection.

For each visual input (an image, or a video as t frames) with a budget of N' tokens
(arXiv 2508.00553, §3.2):

* **anchors**: the ``n_anchor`` tokens that receive the most attention at the object layer;
* **buffers**: their 4-neighbours on the token grid (±1 column, ±1 row), never wrapping across a
  row or a frame edge;
* **registers**: the tokens that receive the most attention at the deep layer among the rest,
  filling the budget exactly.

Fixed-count formulation: one ``TopK(N')`` over a priority key — anchors ``8 + s_obj``, buffers
``4 + s_obj``, every other token ``s_deep`` (scores lie in [0, 1]) — keeps all anchors and
buffers, then the best registers, and stays static-shaped for ONNX and TensorRT. Should anchors
and buffers ever exceed the budget (a large ``alpha`` on a small budget), anchors win, then the
buffers with the highest object-layer score.

Shapes
------
object_scores, deep_scores : [T] float, aligned with the visual tokens
grids    : int[3N] (t, h, w) of each input
budgets  : int[N] tokens kept per input
anchors  : int[N] anchors per input
returns  : (indices [sum budgets] int64 ascending, kinds [sum budgets] int64: 0 anchor, 1 buffer,
           2 register)
"""

from __future__ import annotations

import torch
from torch import Tensor

ANCHOR, BUFFER, REGISTER = 0, 1, 2


def _one(obj: Tensor, deep: Tensor, t: int, h: int, w: int, budget: int, n_anchor: int) -> tuple[Tensor, Tensor]:
    count = t * h * w
    device = obj.device
    role = torch.zeros(count, dtype=torch.long, device=device)  # 2 anchor, 1 buffer, 0 other
    if n_anchor > 0:
        anchors = torch.topk(obj, n_anchor, sorted=True).indices
        frame, rest = anchors // (h * w), anchors % (h * w)
        row, col = rest // w, rest % w
        for d_row, d_col, valid in (
            (0, -1, col > 0),
            (0, 1, col < w - 1),
            (-1, 0, row > 0),
            (1, 0, row < h - 1),
        ):
            neighbour = frame * h * w + (row + d_row).clamp(0, h - 1) * w + (col + d_col).clamp(0, w - 1)
            role[neighbour[valid]] = 1
        role[anchors] = 2
    key = torch.where(role > 0, role.float() * 4 + obj.float(), deep.float())
    chosen = torch.topk(key, budget, sorted=True).indices
    chosen = torch.sort(chosen).values
    kinds = torch.tensor([REGISTER, BUFFER, ANCHOR], device=device)[role[chosen]]
    return chosen, kinds


def reference(
    object_scores: Tensor, deep_scores: Tensor, grids: list[int], budgets: list[int], anchors: list[int]
) -> tuple[Tensor, Tensor]:
    indices, kinds, offset = [], [], 0
    for n, (budget, n_anchor) in enumerate(zip(budgets, anchors)):
        t, h, w = grids[3 * n : 3 * n + 3]
        count = t * h * w
        chosen, kind = _one(
            object_scores[offset : offset + count], deep_scores[offset : offset + count], t, h, w, budget, n_anchor
        )
        indices.append(chosen + offset)
        kinds.append(kind)
        offset += count
    if not indices:
        empty = torch.empty(0, dtype=torch.long, device=object_scores.device)
        return empty, empty.clone()
    return torch.cat(indices), torch.cat(kinds)


@torch.library.custom_op("vlmopt::hiprune_select", mutates_args=())
def hiprune_select(
    object_scores: Tensor, deep_scores: Tensor, grids: list[int], budgets: list[int], anchors: list[int]
) -> tuple[Tensor, Tensor]:
    counts = [grids[i] * grids[i + 1] * grids[i + 2] for i in range(0, len(grids), 3)]
    if sum(counts) != object_scores.shape[0] or object_scores.shape != deep_scores.shape:
        raise ValueError(f"hiprune_select: grids {grids} do not cover {object_scores.shape[0]} scores")
    if any(not 0 <= a <= b <= c for a, b, c in zip(anchors, budgets, counts)):
        raise ValueError(f"hiprune_select: need 0 <= anchors {anchors} <= budgets {budgets} <= counts {counts}")
    return reference(object_scores, deep_scores, grids, budgets, anchors)


@hiprune_select.register_fake
def _(object_scores: Tensor, deep_scores: Tensor, grids: list[int], budgets: list[int], anchors: list[int]):
    total = sum(budgets)
    return object_scores.new_empty((total,), dtype=torch.long), object_scores.new_empty((total,), dtype=torch.long)
