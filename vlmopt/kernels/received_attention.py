"""Triton kernel for ``vlmopt::received_attention``: column means of softmax(scale·QKᵀ), streamed.

Two passes over key/query blocks, never materialising the S×S matrix:

1. per query row, the log-sum-exp of its logits (online max / sum, as in flash attention);
2. per key block, ``Σ_i exp(s_ij − lse_i)`` accumulated over query blocks.

Each program handles one (sequence, head); the host sums heads and divides by H·S. Logits are
computed in fp32 with IEEE dot products (inputs are upcast before ``tl.dot``: a bf16 dot is wrong in
Triton's CPU interpreter, and the ranking HiPrune builds on these scores deserves full precision).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _row_logsumexp(
    q_ptr, k_ptr, lse_ptr, seq, head_dim, heads, scale, stride_n, stride_s,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block_m = tl.program_id(0)
    pair = tl.program_id(1)
    n = pair // heads
    h = pair % heads
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    base = n * stride_n + h * head_dim
    q = tl.load(
        q_ptr + base + rows[:, None] * stride_s + dims[None, :],
        mask=(rows[:, None] < seq) & (dims[None, :] < head_dim),
        other=0.0,
    ).to(tl.float32)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, seq, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_ptr + base + cols[:, None] * stride_s + dims[None, :],
            mask=(cols[:, None] < seq) & (dims[None, :] < head_dim),
            other=0.0,
        ).to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        logits = tl.where(cols[None, :] < seq, logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, 1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
        running_max = new_max
    tl.store(lse_ptr + pair * seq + rows, running_max + tl.log(running_sum), mask=rows < seq)


@triton.jit
def _column_sums(
    q_ptr, k_ptr, lse_ptr, out_ptr, seq, head_dim, heads, scale, stride_n, stride_s,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block_n = tl.program_id(0)
    pair = tl.program_id(1)
    n = pair // heads
    h = pair % heads
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    base = n * stride_n + h * head_dim
    k = tl.load(
        k_ptr + base + cols[:, None] * stride_s + dims[None, :],
        mask=(cols[:, None] < seq) & (dims[None, :] < head_dim),
        other=0.0,
    ).to(tl.float32)
    total = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, seq, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = tl.load(
            q_ptr + base + rows[:, None] * stride_s + dims[None, :],
            mask=(rows[:, None] < seq) & (dims[None, :] < head_dim),
            other=0.0,
        ).to(tl.float32)
        lse = tl.load(lse_ptr + pair * seq + rows, mask=rows < seq, other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        probs = tl.exp(logits - lse[:, None])
        probs = tl.where((rows[:, None] < seq) & (cols[None, :] < seq), probs, 0.0)
        total += tl.sum(probs, 0)
    tl.store(out_ptr + pair * seq + cols, total, mask=cols < seq)


def received_attention_triton(q: Tensor, k: Tensor, num_heads: int, scale: float, block: int = 64) -> Tensor:
    """[N, S] scores from q, k [N, S, H·D] (same contract as the reference)."""
    q, k = q.contiguous(), k.contiguous()
    batch, seq, width = q.shape
    head_dim = width // num_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    lse = torch.empty(batch * num_heads, seq, dtype=torch.float32, device=q.device)
    per_head = torch.empty(batch * num_heads, seq, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(seq, block), batch * num_heads)
    common = (seq, head_dim, num_heads, scale, q.stride(0), q.stride(1))
    _row_logsumexp[grid](q, k, lse, *common, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d)
    _column_sums[grid](q, k, lse, per_head, *common, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d)
    return per_head.view(batch, num_heads, seq).sum(1) / (num_heads * seq)
