"""``vlmopt::topk_indices`` — a fixed number of top-scoring tokens per visual input, sorted.

The visual tokens of a batch are flat ``[T]``; ``counts`` says how many belong to each visual input
(image or video) and ``keep`` how many of those to keep. Indices are global (into ``[T]``) and
ascending, so gathering with them keeps every input's tokens in raster order.

Shapes
------
scores  : [T] float, higher = keep
counts  : int[N], sum = T
keep    : int[N], keep[i] <= counts[i]
returns : [sum(keep)] int64, ascending
ONNX    : per input, ``Slice`` + ``TopK(k, sorted=1)``; ascending order by a second ``TopK`` on the
          negated indices (no ``Sort`` op is needed, and no data-dependent shape appears).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def reference(scores: Tensor, counts: list[int], keep: list[int]) -> Tensor:
    out, offset = [], 0
    for count, k in zip(counts, keep):
        segment = scores[offset : offset + count]
        chosen = torch.topk(segment, k, largest=True, sorted=True).indices
        out.append(torch.sort(chosen).values + offset)
        offset += count
    if not out:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    return torch.cat(out)


@torch.library.custom_op("vlmopt::topk_indices", mutates_args=())
def topk_indices(scores: Tensor, counts: list[int], keep: list[int]) -> Tensor:
    if sum(counts) != scores.shape[0] or len(counts) != len(keep):
        raise ValueError(f"topk_indices: counts {counts} do not cover {scores.shape[0]} scores")
    if any(k > c or k < 0 for k, c in zip(keep, counts)):
        raise ValueError(f"topk_indices: keep {keep} must lie within counts {counts}")
    return reference(scores, counts, keep)


@topk_indices.register_fake
def _(scores: Tensor, counts: list[int], keep: list[int]) -> Tensor:
    return scores.new_empty((sum(keep),), dtype=torch.long)


#: Index bookkeeping, no arithmetic worth counting.
flop_formula = None


def onnx_translation():
    """The op in standard ONNX (onnxscript, trace-only; imported lazily): ``Slice`` + ``TopK(sorted=1)``.

    The ascending order comes from a second ``TopK`` over the negated indices, cast to float (exact
    below 2**24 tokens): TensorRT's ``TopK`` reads float inputs.
    """
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset18 as op

    float32, int64 = 1, 7  # onnx.TensorProto.FLOAT, INT64

    def topk_indices(scores, counts: Sequence[int], keep: Sequence[int]):
        parts, offset = [], 0
        for count, k in zip(counts, keep):
            if k:
                segment = op.Slice(scores, [offset], [offset + count], [0])
                _, chosen = op.TopK(segment, [k], axis=0, largest=1, sorted=1)
                ascending, _ = op.TopK(op.Neg(op.Cast(chosen, to=float32)), [k], axis=0, largest=1, sorted=1)
                parts.append(op.Add(op.Cast(op.Neg(ascending), to=int64), op.Constant(value_int=offset)))
            offset += count
        if not parts:
            return op.Constant(value=ir.tensor(np.zeros(0, dtype=np.int64)))
        return parts[0] if len(parts) == 1 else op.Concat(*parts, axis=0)

    return topk_indices
