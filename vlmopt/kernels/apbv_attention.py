"""Triton kernel for ``vlmopt::apbv_attention``: flash-attention forward with APB-V's mask.

One program per (query block, batch·head). It streams key/value blocks with an online softmax
(running max and sum in the log2 domain, fp32 accumulator) and never materialises the mask: the
visibility of (query i, key j) is computed from indices, ``j ≤ passing_len + i and (i ≥ anchor_len
or j ≥ passing_len)`` (see :mod:`vlmopt.ops.apbv_attention`). Work is skipped, not masked, where it
can be:

- keys past ``passing_len + last row`` are never loaded (bottom-right causal bound);
- a query block made only of anchor rows starts at the first anchor key (it never reads the
  passing block: the official CUDA fork does the same with ``n_block_min``);
- only key blocks that straddle a boundary (the causal diagonal, the passing/anchor edge for anchor
  rows, the end of the keys) pay for the mask.

GQA reads KV head ``h // (H / Hkv)``; no copy of K/V is made. In Triton's CPU interpreter
(``TRITON_INTERPRET=1``) and for fp32 inputs the operands are upcast to fp32 and multiplied with IEEE
precision (a bf16 ``tl.dot`` is wrong in the interpreter); on a GPU, fp16/bf16 inputs use the native
tensor-core dot with fp32 accumulation, as FlashAttention does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2_E = 1.4426950408889634


@triton.jit
def _apbv_forward(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    heads, group, query_len, key_len, anchor_len, passing_len, head_dim, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    block_m = tl.program_id(0)
    pair = tl.program_id(1)
    batch = pair // heads
    head = pair % heads
    kv_head = head // group
    row_start = block_m * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < query_len
    dim_ok = dims < head_dim

    q = tl.load(
        q_ptr + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qs + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if FP32_DOT:
        q = q.to(tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Anchor-only query blocks never see the passing keys; no row sees past passing_len + its index.
    lo = tl.where(row_start + BLOCK_M <= anchor_len, passing_len, 0)
    hi = tl.minimum(key_len, passing_len + row_start + BLOCK_M)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < key_len
        k = tl.load(k_base + cols[:, None] * stride_ks + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        if FP32_DOT:
            logits = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            logits = tl.dot(q, tl.trans(k))
        logits = logits * qk_scale_log2
        needs_mask = (
            (start + BLOCK_N > passing_len + row_start + 1)
            | (start + BLOCK_N > key_len)
            | ((start < passing_len) & (row_start < anchor_len))
        )
        if needs_mask:
            visible = (cols[None, :] <= rows[:, None] + passing_len) & (
                (rows[:, None] >= anchor_len) | (cols[None, :] >= passing_len)
            )
            logits = tl.where(visible & col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, 1))
        # Rows with no visible key yet keep max -inf; shifting by 0 keeps exp2 free of NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(logits - shift[:, None])
        correction = tl.exp2(running_max - shift)
        running_sum = running_sum * correction + tl.sum(probs, 1)
        acc = acc * correction[:, None]
        if FP32_DOT:
            acc += tl.dot(probs, v.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(probs.to(v.dtype), v)
        running_max = new_max

    out = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
    tl.store(
        out_ptr + batch * stride_ob + head * stride_oh + rows[:, None] * stride_os + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )
    lse = (running_max + tl.log2(running_sum)) * 0.6931471805599453  # log2 -> natural log
    tl.store(lse_ptr + pair * query_len + rows, lse, mask=row_ok)


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_config(dtype: torch.dtype, head_dim: int) -> dict:
    """Block sizes, warps and pipeline stages for one launch (GPU defaults tuned for head dim ≤ 128)."""
    if interpreting():
        return {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32 or head_dim > 128:
        return {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}
    return {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}


def apbv_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    anchor_len: int,
    passing_len: int,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out [B, H, Sq, D], lse [B, H, Sq] fp32)``, the contract of the reference.

    Inputs are ``[B, H, S, D]`` (``[B, Hkv, Sk, D]`` for k, v) with any strides whose last dim is
    contiguous (others are copied). The launch settings default to :func:`default_config`.
    """
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    batch, heads, query_len, head_dim = q.shape
    key_len = k.shape[2]
    config = default_config(q.dtype, head_dim)
    block_m = block_m or config["block_m"]
    block_n = block_n or config["block_n"]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, query_len, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    grid = (triton.cdiv(query_len, block_m), batch * heads)
    _apbv_forward[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, heads // k.shape[1], query_len, key_len, anchor_len, passing_len, head_dim,
        scale * LOG2_E,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        FP32_DOT=interpreting() or q.dtype == torch.float32,
        num_warps=num_warps or config["num_warps"],
        num_stages=num_stages or config["num_stages"],
    )
    return out, lse

