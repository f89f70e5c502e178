"""``vlmopt::pool_tokens`` — adaptive average pooling of each visual input's token grid.

The "downsample" baseline: every frame's (h, w) grid of tokens is average-pooled to (h', w') with
PyTorch's adaptive windows (window i spans rows floor(i·h/h') .. ceil((i+1)·h/h')). Each pooled
token stands in for the token at its window's top-left corner, whose position id it takes.

Shapes
------
x         : [T, D] tokens, each input's tokens in raster order (t, h, w)
grids     : int[3N] (t, h, w) of each input, flattened
out_grids : int[2N] (h', w') of each input, flattened
returns   : (pooled [T', D], anchor [T'] int64 global index of each pooled token's top-left token)
ONNX      : one MatMul per input with a constant pooling matrix [t·h'·w', t·h·w].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _window_starts(size: int, out: int) -> list[int]:
    return [(i * size) // out for i in range(out)]


def anchor_index(grids: list[int], out_grids: list[int], device=None) -> Tensor:
    """Global index of the top-left token of every pooling window, ascending."""
    anchors, offset = [], 0
    for n in range(len(grids) // 3):
        t, h, w = grids[3 * n : 3 * n + 3]
        out_h, out_w = out_grids[2 * n : 2 * n + 2]
        rows = torch.tensor(_window_starts(h, out_h))
        cols = torch.tensor(_window_starts(w, out_w))
        frame = (rows[:, None] * w + cols[None, :]).flatten()
        anchors.append(torch.cat([frame + f * h * w for f in range(t)]) + offset)
        offset += t * h * w
    if not anchors:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(anchors).to(device)


def reference(x: Tensor, grids: list[int], out_grids: list[int]) -> tuple[Tensor, Tensor]:
    pooled, offset = [], 0
    for n in range(len(grids) // 3):
        t, h, w = grids[3 * n : 3 * n + 3]
        out_h, out_w = out_grids[2 * n : 2 * n + 2]
        frames = x[offset : offset + t * h * w].reshape(t, h, w, -1).permute(0, 3, 1, 2)
        frames = F.adaptive_avg_pool2d(frames, (out_h, out_w))
        pooled.append(frames.permute(0, 2, 3, 1).reshape(t * out_h * out_w, -1))
        offset += t * h * w
    out = torch.cat(pooled) if pooled else x[:0]
    return out, anchor_index(grids, out_grids, x.device)


@torch.library.custom_op("vlmopt::pool_tokens", mutates_args=())
def pool_tokens(x: Tensor, grids: list[int], out_grids: list[int]) -> tuple[Tensor, Tensor]:
    if sum(grids[i] * grids[i + 1] * grids[i + 2] for i in range(0, len(grids), 3)) != x.shape[0]:
        raise ValueError(f"pool_tokens: grids {grids} do not cover {x.shape[0]} tokens")
    return reference(x, grids, out_grids)


@pool_tokens.register_fake
def _(x: Tensor, grids: list[int], out_grids: list[int]) -> tuple[Tensor, Tensor]:
    total = sum(grids[3 * n] * out_grids[2 * n] * out_grids[2 * n + 1] for n in range(len(grids) // 3))
    return x.new_empty((total, x.shape[1])), x.new_empty((total,), dtype=torch.long)


def _setup_context(ctx, inputs, output) -> None:
    x, grids, out_grids = inputs
    ctx.x_shape, ctx.grids, ctx.out_grids = x.shape, grids, out_grids


def _backward(ctx, grad_pooled: Tensor, grad_anchor: Tensor):
    """Each token receives the gradient of every window holding it over the window's size (the
    adjoint of :func:`reference`'s adaptive average pooling, frame by frame)."""
    parts, offset = [], 0
    grids, out_grids = ctx.grids, ctx.out_grids
    for n in range(len(grids) // 3):
        t, h, w = grids[3 * n : 3 * n + 3]
        out_h, out_w = out_grids[2 * n : 2 * n + 2]
        grad = grad_pooled[offset : offset + t * out_h * out_w].reshape(t, out_h, out_w, -1).permute(0, 3, 1, 2)
        frames = grad.new_empty((t, grad.shape[1], h, w))  # only its shape is read
        spread = torch.ops.aten._adaptive_avg_pool2d_backward(grad.contiguous(), frames)
        parts.append(spread.permute(0, 2, 3, 1).reshape(t * h * w, -1))
        offset += t * out_h * out_w
    return (torch.cat(parts) if parts else grad_pooled.new_zeros(ctx.x_shape)), None, None


pool_tokens.register_autograd(_backward, setup_context=_setup_context)


def pooling_matrix(grid: list[int], out_grid: list[int]) -> Tensor:
    """[t·h'·w', t·h·w] float32 matrix ``P`` with ``pool(x) = P @ x`` for one input's tokens ``x``."""
    t, h, w = grid
    return reference(torch.eye(t * h * w), list(grid), list(out_grid))[0]


#: Averaging windows of tokens: negligible next to the model, not counted.
flop_formula = None


def onnx_translation():
    """The op in standard ONNX (onnxscript, trace-only; imported lazily): per input, ``Slice`` +
    ``MatMul`` with a constant pooling matrix; the anchors are a constant."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    def pool_tokens(x, grids: Sequence[int], out_grids: Sequence[int]):
        pooled, offset = [], 0
        for n in range(len(grids) // 3):
            grid, out_grid = list(grids[3 * n : 3 * n + 3]), list(out_grids[2 * n : 2 * n + 2])
            count = grid[0] * grid[1] * grid[2]
            matrix = op.Constant(value=ir.tensor(pooling_matrix(grid, out_grid).numpy(), name=f"pool_matrix_{n}"))
            segment = op.Slice(x, [offset], [offset + count], [0])
            pooled.append(op.MatMul(op.CastLike(matrix, x), segment))
            offset += count
        out = pooled[0] if len(pooled) == 1 else op.Concat(*pooled, axis=0)
        anchors = anchor_index(list(grids), list(out_grids)).numpy()
        return out, op.Constant(value=ir.tensor(anchors, name="pool_anchors"))

    return pool_tokens
