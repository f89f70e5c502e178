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
