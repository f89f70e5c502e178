"""Triton kernel for ``vlmopt::kcenter_select``: all k farthest-point steps of a row in one program.

The host L2-normalises the rows and computes the anchors' initial coverage (one matmul per row,
shared with the reference), then one program per batch row runs the sequential greedy loop:

1. argmax of the row's running score vector, block by block, keeping the first maximum (a later
   block replaces the best only when strictly larger, so ties go to the lowest index, as in
   ``torch.argmax``);
2. one pass over the row's tokens: the cosine distance to the new pick (dot products over blocks of
   channels, fp32), ``score = min(score, distance)``, and the pick itself set to ``TAKEN``.

The running scores live in a [B, N] fp32 scratch buffer (global memory, L2-resident for HalfV's
sizes); each token is loaded and stored by the same lanes within a step, and a barrier separates the
update pass from the next argmax. This removes the ~4 launches per step of the PyTorch loop; the
price is that one row is one program (one SM), so a batch of one does not fill the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vlmopt.ops.kcenter_select import TAKEN, initial_scores, normalized_rows


@triton.jit
def _kcenter_rows(
    unit_ptr, score_ptr, picks_ptr, tokens, width, k, taken,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    unit_row = unit_ptr + row * tokens * width
    score_row = score_ptr + row * tokens
    lanes = tl.arange(0, BLOCK_N)
    channels = tl.arange(0, BLOCK_D)
    for step in range(k):
        best_value = tl.full([], -3.0, tl.float32)  # below TAKEN and the padding
        best_index = tl.full([], 0, tl.int32)
        for start in range(0, tokens, BLOCK_N):
            offsets = start + lanes
            scores = tl.load(score_row + offsets, mask=offsets < tokens, other=-2.0)
            block_max = tl.max(scores, 0)
            block_index = tl.min(tl.where(scores == block_max, offsets, tokens), 0)
            better = block_max > best_value
            best_index = tl.where(better, block_index, best_index)
            best_value = tl.maximum(best_value, block_max)
        tl.store(picks_ptr + row * k + step, best_index.to(tl.int64))
        picked_row = unit_row + best_index.to(tl.int64) * width
        for start in range(0, tokens, BLOCK_N):
            offsets = start + lanes
            inside = offsets < tokens
            dot = tl.zeros([BLOCK_N], tl.float32)
            for channel_start in range(0, width, BLOCK_D):
                dims = channel_start + channels
                picked = tl.load(picked_row + dims, mask=dims < width, other=0.0)
                block = tl.load(
                    unit_row + offsets[:, None].to(tl.int64) * width + dims[None, :],
                    mask=inside[:, None] & (dims[None, :] < width),
                    other=0.0,
                )
                dot += tl.sum(block * picked[None, :], 1)
            scores = tl.load(score_row + offsets, mask=inside, other=taken)
            scores = tl.minimum(scores, 1.0 - dot)
            scores = tl.where(offsets == best_index, taken, scores)
            tl.store(score_row + offsets, scores, mask=inside)
        tl.debug_barrier()


def kcenter_select_triton(x: Tensor, candidates: Tensor, anchors: Tensor, k: int, block_n: int = 128, block_d: int = 64) -> Tensor:
    """[B, k] ascending int64 picks (same contract as the reference; inputs already checked)."""
    unit = normalized_rows(x).contiguous()
    scores = initial_scores(unit, candidates, anchors).contiguous()
    batch, tokens, width = unit.shape
    picks = torch.empty(batch, k, dtype=torch.long, device=x.device)
    if k == 0 or batch == 0:
        return picks
    block_n = min(block_n, max(16, triton.next_power_of_2(tokens)))
    block_d = min(block_d, max(16, triton.next_power_of_2(width)))
    _kcenter_rows[(batch,)](unit, scores, picks, tokens, width, k, TAKEN, BLOCK_N=block_n, BLOCK_D=block_d)
    return picks.sort(dim=1).values
