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

from collections.abc import Sequence

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


def neighbour_table(t: int, h: int, w: int) -> Tensor:
    """[t·h·w, 4] int64: each token's left/right/up/down neighbour on its frame's grid, or itself at
    an edge (clamping, as :func:`_one` does; an anchor's own slot is then marked an anchor anyway)."""
    index = torch.arange(t * h * w)
    frame, rest = index // (h * w), index % (h * w)
    row, col = rest // w, rest % w
    columns = []
    for d_row, d_col in ((0, -1), (0, 1), (-1, 0), (1, 0)):
        columns.append(frame * h * w + (row + d_row).clamp(0, h - 1) * w + (col + d_col).clamp(0, w - 1))
    return torch.stack(columns, dim=1)


#: Top-k selection and neighbour bookkeeping, no arithmetic worth counting.
flop_formula = None


def onnx_translation():
    """The op in standard ONNX (onnxscript, trace-only; imported lazily).

    Per input: ``TopK`` for the anchors, a constant neighbour table (``Gather``) for the buffers,
    two ``ScatterND`` for the roles, ``TopK(sorted=1)`` over the priority key, and a second ``TopK``
    over the negated (float) indices for ascending order. No data-dependent shape appears.
    """
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset18 as op

    float32, int64 = 1, 7  # onnx.TensorProto.FLOAT, INT64

    def constant(array, name=None):
        return op.Constant(value=ir.tensor(np.ascontiguousarray(array), name=name))

    def hiprune_select(object_scores, deep_scores, grids: Sequence[int], budgets: Sequence[int], anchors: Sequence[int]):
        indices, kinds, offset = [], [], 0
        for n, (budget, n_anchor) in enumerate(zip(budgets, anchors)):
            t, h, w = grids[3 * n : 3 * n + 3]
            count = t * h * w
            if budget:
                obj = op.Cast(op.Slice(object_scores, [offset], [offset + count], [0]), to=float32)
                deep = op.Cast(op.Slice(deep_scores, [offset], [offset + count], [0]), to=float32)
                role = constant(np.zeros(count, dtype=np.int64))
                if n_anchor:
                    _, chosen = op.TopK(obj, [n_anchor], axis=0, largest=1, sorted=1)
                    table = constant(neighbour_table(t, h, w).numpy(), name=f"hiprune_neighbours_{n}")
                    buffers = op.Reshape(op.Gather(table, chosen, axis=0), [-1, 1])
                    role = op.ScatterND(role, buffers, op.ConstantOfShape(op.Shape(buffers, start=0, end=1), value=ir.tensor(np.array([1], dtype=np.int64))))
                    role = op.ScatterND(role, op.Unsqueeze(chosen, [1]), op.ConstantOfShape(op.Shape(chosen), value=ir.tensor(np.array([2], dtype=np.int64))))
                marked = op.Add(op.Mul(op.Cast(role, to=float32), op.Constant(value_float=4.0)), obj)
                key = op.Where(op.Greater(role, op.Constant(value_int=0)), marked, deep)
                _, kept = op.TopK(key, [budget], axis=0, largest=1, sorted=1)
                ascending, _ = op.TopK(op.Neg(op.Cast(kept, to=float32)), [budget], axis=0, largest=1, sorted=1)
                kept = op.Cast(op.Neg(ascending), to=int64)
                indices.append(op.Add(kept, op.Constant(value_int=offset)))
                kinds.append(op.Sub(op.Constant(value_int=REGISTER), op.Gather(role, kept, axis=0)))
            offset += count
        if not indices:
            empty = constant(np.zeros(0, dtype=np.int64))
            return empty, op.Identity(empty)
        if len(indices) == 1:
            return indices[0], kinds[0]
        return op.Concat(*indices, axis=0), op.Concat(*kinds, axis=0)

    return hiprune_select
