"""``vlmopt::kcenter_select`` — batched k-center greedy (farthest-point) selection of tokens.

HalfV's "coverage expansion" (arXiv 2604.16462, Step 1): after a few tokens are kept for their
relevance (the *anchors*), the rest of the budget goes, one token at a time, to the candidate that
is farthest from everything selected so far, so the kept set covers the hidden-state space.

Distance: the op L2-normalises every row of ``x`` itself (``x / max(‖x‖, 1e-12)``; a zero row stays
zero) and uses the cosine distance ``d(u, v) = 1 − x̂_u · x̂_v`` ∈ [0, 2], as HalfV does on its
final-norm'd hidden states. Each token keeps its distance to the nearest selected token; a step picks
the eligible candidate (a candidate that is not an anchor and not yet picked) with the largest such
distance, ties going to the lowest index, then lowers every token's distance by the new pick's.

Start: the anchors are the initial selected set; they may lie anywhere in the row (inside or outside
the candidates) and are never returned. A row without anchors has no coverage yet: all its tokens
sit at the same "uncovered" distance (4, above any cosine distance), so its first pick is its
lowest-index eligible candidate. The selection is therefore fully deterministic: no random seed, and
the same inputs give the same indices on every backend up to ties broken by rounding.

Shapes
------
x          : [B, N, D] float hidden states (any float dtype; distances in float32)
candidates : [B, N] bool, the tokens that may be picked
anchors    : [B, N] bool, the tokens already selected
k          : int ≥ 0, how many new tokens to pick per row; every row needs at least k candidates
             that are not anchors (else :class:`~vlmopt.errors.InputError`)
returns    : [B, k] int64, the picked indices of each row, ascending (anchors not included)
FLOPs      : 2·B·N·D·k for the coverage updates, + 3·B·N·D for the normalisation. The anchors'
             initial coverage costs another 2·N·D per anchor; their number is data, not a shape, so
             it is not counted.
Kernels    : the reference keeps a running [B, N] min-distance vector (O(k·N·D), one small matmul
             per step); on CUDA the Triton kernel in :mod:`vlmopt.kernels.kcenter_select` runs all k
             steps of a row in one program, without a launch per step (the reference where triton
             is not installed).
ONNX       : unrolled over the static ``k`` (≈ 6 nodes per pick): ``ArgMax`` (first maximum, as
             here), ``ScatterElements`` of −1 at the pick, ``GatherElements`` of its similarity row,
             ``Min``; the anchors' coverage is one ``MatMul`` [B, N, N] + ``Where`` + ``ReduceMin``,
             so the graph holds an N×N similarity matrix. The final ascending sort is a ``TopK`` on
             the negated indices (TensorRT: k < 3840).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmopt.errors import InputError

UNCOVERED = 4.0
"""Distance of a token no selected token covers yet (above the largest cosine distance, 2)."""
TAKEN = -1.0
"""Score of a token that cannot be picked (not a candidate, an anchor, or already picked)."""
NORM_EPS = 1e-12
"""Rows are divided by ``max(‖x‖, NORM_EPS)``, as ``torch.nn.functional.normalize`` does."""


def _check(x: Tensor, candidates: Tensor, anchors: Tensor, k: int) -> None:
    if x.dim() != 3 or not x.dtype.is_floating_point:
        raise InputError(f"kcenter_select: x must be float [B, N, D], got {x.dtype} {tuple(x.shape)}")
    for name, mask in (("candidates", candidates), ("anchors", anchors)):
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
            raise InputError(
                f"kcenter_select: {name} must be bool [B, N] = {list(x.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
            )
    if k < 0:
        raise InputError(f"kcenter_select: k must be ≥ 0, got {k}")


def _check_available(candidates: Tensor, anchors: Tensor, k: int) -> None:
    """Every row needs k eligible tokens (a data check: it reads the masks)."""
    if k == 0:
        return
    available = (candidates & ~anchors).sum(dim=1)
    short = (available < k).nonzero().flatten().tolist()
    if short:
        raise InputError(
            f"kcenter_select: k={k} but row(s) {short} have only {available[short].tolist()} candidate(s) that "
            "are not anchors; lower k or widen the candidates"
        )


def normalized_rows(x: Tensor) -> Tensor:
    return F.normalize(x.float(), p=2.0, dim=-1, eps=NORM_EPS)


def initial_scores(unit: Tensor, candidates: Tensor, anchors: Tensor) -> Tensor:
    """[B, N] float32: each eligible token's distance to its nearest anchor (``UNCOVERED`` without
    anchors), ``TAKEN`` for every token that cannot be picked."""
    batch, tokens, _ = unit.shape
    nearest = torch.full((batch, tokens), UNCOVERED, dtype=torch.float32, device=unit.device)
    for row in range(batch):
        chosen = anchors[row].nonzero().flatten()
        if chosen.numel():
            nearest[row] = (1.0 - unit[row] @ unit[row, chosen].T).amin(dim=1)
    return torch.where(candidates & ~anchors, nearest, TAKEN)


def reference(x: Tensor, candidates: Tensor, anchors: Tensor, k: int) -> Tensor:
    unit = normalized_rows(x)
    score = initial_scores(unit, candidates, anchors)
    picks = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    for step in range(k):
        pick = score.argmax(dim=1, keepdim=True)  # first maximum: ties go to the lowest index
        picks[:, step] = pick[:, 0]
        picked = unit.gather(1, pick[:, :, None].expand(-1, -1, unit.shape[2]))  # [B, 1, D]
        distance = 1.0 - torch.bmm(unit, picked.transpose(1, 2))[:, :, 0]
        # TAKEN stays TAKEN: every distance is ≥ 0 up to rounding, far above −1.
        score = torch.minimum(score.scatter(1, pick, TAKEN), distance)
    return picks.sort(dim=1).values


@torch.library.custom_op("vlmopt::kcenter_select", mutates_args=())
def kcenter_select(x: Tensor, candidates: Tensor, anchors: Tensor, k: int) -> Tensor:
    _check(x, candidates, anchors, k)
    _check_available(candidates, anchors, k)
    if x.is_cuda and k and importlib.util.find_spec("triton") is not None:  # same picks without it, one launch per step
        from vlmopt.kernels.kcenter_select import kcenter_select_triton

        return kcenter_select_triton(x, candidates, anchors, k)
    return reference(x, candidates, anchors, k)


@kcenter_select.register_fake
def _(x: Tensor, candidates: Tensor, anchors: Tensor, k: int) -> Tensor:
    _check(x, candidates, anchors, k)
    return x.new_empty((x.shape[0], k), dtype=torch.long)


def flop_formula(x_shape, candidates_shape, anchors_shape, k: int, *args, out_shape=None, **kwargs) -> int:
    """2·B·N·D per pick (its distance to every token) + 3·B·N·D to normalise the rows."""
    batch, tokens, width = x_shape
    return 2 * batch * tokens * width * k + 3 * batch * tokens * width


def onnx_translation():
    """The op in standard ONNX (onnxscript, trace-only; imported lazily), unrolled over ``k``.

    The graph cannot check that every row has k eligible candidates (that is data); a row short of
    them gets picks among its ``TAKEN`` tokens instead of an error, so callers size ``k`` from
    static counts (HalfV: a fixed fraction of a fixed visual span).
    """
    from onnxscript import opset18 as op

    float32, int64 = 1, 7  # onnx.TensorProto.FLOAT, INT64

    def kcenter_select(x, candidates, anchors, k: int):
        if k == 0:  # [B, 0]: an empty slice keeps the batch axis dynamic
            return op.Cast(op.Slice(candidates, [0], [0], [1]), to=int64)
        values = op.Cast(x, to=float32)
        norm = op.Sqrt(op.ReduceSumSquare(values, op.Constant(value_ints=[2]), keepdims=1))
        unit = op.Div(values, op.Max(norm, op.Constant(value_float=NORM_EPS)))
        similarity = op.MatMul(unit, op.Transpose(unit, perm=[0, 2, 1]))  # [B, N, N]
        distance = op.Sub(op.Constant(value_float=1.0), similarity)
        to_anchor = op.Where(op.Unsqueeze(anchors, op.Constant(value_ints=[1])), distance, op.Constant(value_float=UNCOVERED))
        nearest = op.ReduceMin(to_anchor, op.Constant(value_ints=[2]), keepdims=0)  # [B, N]
        eligible = op.And(candidates, op.Not(anchors))
        score = op.Where(eligible, nearest, op.Constant(value_float=TAKEN))
        row_shape = op.Concat(op.Shape(x, start=0, end=1), op.Constant(value_ints=[1]), op.Shape(x, start=1, end=2), axis=0)
        taken = op.Expand(op.Constant(value_floats=[TAKEN]), op.Shape(x, start=0, end=1))
        taken = op.Unsqueeze(taken, op.Constant(value_ints=[1]))  # [B, 1]
        picks = []
        for _ in range(k):
            pick = op.ArgMax(score, axis=1, keepdims=1, select_last_index=0)  # [B, 1]
            picks.append(pick)
            row = op.GatherElements(distance, op.Expand(op.Unsqueeze(pick, op.Constant(value_ints=[2])), row_shape), axis=1)
            score = op.Min(op.ScatterElements(score, pick, taken, axis=1), op.Squeeze(row, op.Constant(value_ints=[1])))
        picked = picks[0] if k == 1 else op.Concat(*picks, axis=1)  # [B, k]
        ascending, _ = op.TopK(op.Neg(op.Cast(picked, to=float32)), op.Constant(value_ints=[k]), axis=1, largest=1, sorted=1)
        return op.Cast(op.Neg(ascending), to=int64)

    return kcenter_select
