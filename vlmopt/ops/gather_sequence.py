"""``vlmopt::gather_sequence`` — keep a subset of the LLM sequence, the same subset on every edge.

Every tensor that carries the sequence dimension (hidden states, 2-D attention mask, 1-D or M-RoPE
position ids, cos/sin) goes through this op with the same index, so they stay aligned. Slots with
index ``-1`` are padding (rows that keep fewer tokens than the longest row are left-padded): they
read as zeros, which is a masked-out slot for an attention mask.

Shapes
------
x         : any tensor with a batch dim ``batch_dim`` and a sequence dim ``seq_dim`` (e.g. [B, S, D],
            [B, S], or [3, B, S] for M-RoPE ids with batch_dim=1, seq_dim=2)
index     : [B, S'] int64 positions into the sequence, sorted ascending within a row, -1 = padding
returns   : x with the sequence dim reduced to S'
ONNX      : GatherElements on the clamped index + Where for the padding slots.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reference(x: Tensor, index: Tensor, batch_dim: int, seq_dim: int) -> Tensor:
    moved = x.movedim((batch_dim, seq_dim), (0, 1))
    batch, kept = index.shape
    trailing = moved.shape[2:]
    view = (batch, kept) + (1,) * len(trailing)
    gather_index = index.clamp_min(0).view(view).expand((batch, kept) + tuple(trailing))
    out = torch.gather(moved, 1, gather_index)
    out = out.masked_fill((index < 0).view(view), 0)
    return out.movedim((0, 1), (batch_dim, seq_dim)).contiguous()


@torch.library.custom_op("vlmopt::gather_sequence", mutates_args=())
def gather_sequence(x: Tensor, index: Tensor, batch_dim: int, seq_dim: int) -> Tensor:
    return reference(x, index, batch_dim, seq_dim)


@gather_sequence.register_fake
def _(x: Tensor, index: Tensor, batch_dim: int, seq_dim: int) -> Tensor:
    shape = list(x.shape)
    shape[seq_dim] = index.shape[1]
    return x.new_empty(shape)


def _setup_context(ctx, inputs, output) -> None:
    x, index, batch_dim, seq_dim = inputs
    ctx.save_for_backward(index)
    ctx.x_shape, ctx.batch_dim, ctx.seq_dim = x.shape, batch_dim, seq_dim


def _backward(ctx, grad: Tensor):
    (index,) = ctx.saved_tensors
    moved = grad.movedim((ctx.batch_dim, ctx.seq_dim), (0, 1))
    batch, kept = index.shape
    full_shape = list(ctx.x_shape)
    full = moved.new_zeros([full_shape[ctx.batch_dim], full_shape[ctx.seq_dim], *moved.shape[2:]])
    view = (batch, kept) + (1,) * (moved.dim() - 2)
    moved = moved.masked_fill((index < 0).view(view), 0)
    full.scatter_add_(1, index.clamp_min(0).view(view).expand(moved.shape), moved)
    return full.movedim((0, 1), (ctx.batch_dim, ctx.seq_dim)), None, None, None


gather_sequence.register_autograd(_backward, setup_context=_setup_context)


#: A gather, no arithmetic.
flop_formula = None


def onnx_translation():
    """The op in standard ONNX (onnxscript, trace-only; imported lazily): ``GatherElements`` + ``Where``."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    def gather_sequence(x, index, batch_dim: int, seq_dim: int):
        rank = len(x.shape)
        if batch_dim > seq_dim:  # the unsqueezed index must list its dims in x's order
            index = op.Transpose(index, perm=[1, 0])
        other = [d for d in range(rank) if d not in (batch_dim, seq_dim)]
        view = op.Unsqueeze(index, op.Constant(value_ints=other)) if other else index
        parts = [op.Shape(x, start=0, end=seq_dim)] if seq_dim > 0 else []
        parts.append(op.Shape(index, start=1, end=2) if batch_dim < seq_dim else op.Shape(index, start=0, end=1))
        if seq_dim < rank - 1:
            parts.append(op.Shape(x, start=seq_dim + 1))
        safe = op.Expand(op.Max(view, op.Constant(value_int=0)), op.Concat(*parts, axis=0))
        gathered = op.GatherElements(x, safe, axis=seq_dim)
        padding = op.Less(view, op.Constant(value_int=0))
        if x.dtype == ir.DataType.BOOL:  # onnxruntime has no bool Where (a gathered visual-span mask)
            return op.And(gathered, op.Not(padding))
        return op.Where(padding, op.CastLike(op.Constant(value_int=0), x), gathered)

    return gather_sequence
