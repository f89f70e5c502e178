"""``vlmopt::received_attention`` — how much attention each token receives in one attention layer.

``score[n, j] = mean over heads h and queries i of softmax_j(scale · q_hi · k_hj)`` — the column
means of the attention matrix, computed from the layer's own Q/K projections so the model keeps
running SDPA (HF's eager attention would be needed to read attention weights otherwise). This is
HiPrune's token score (arXiv 2508.00553, §3.1); every query row, CLS included, votes.

Shapes
------
q, k    : [N, S, H·D] queries and keys of N independent sequences (images or frames)
returns : [N, S] float32 scores in [0, 1]; each row sums to 1
Kernels : both paths stream and never hold an S×S matrix. The reference (CPU, and differentiable
          for training) takes blocks of query rows of all heads at once: logits [N, H, Bq, S] →
          softmax along keys → summed into a running [N, S] column sum; Bq is chosen so a block
          holds ``BLOCK_ELEMENTS`` floats (fits the CPU's caches). On CUDA the Triton kernel in
          :mod:`vlmopt.kernels.received_attention` streams key and query blocks.
FLOPs   : 2·N·H·S²·D (the QKᵀ product), registered with the FLOP counter.
"""

from __future__ import annotations

import torch
from torch import Tensor


#: Floats in one block of logits of the reference, [sequences, H, Bq, S]: 2^18 (1 MiB, one core's L2
#: here). Measured on the 2-core CPU, one thread, with other jobs running (median ms at S = 4,096 /
#: S = 577, H = 16): 2^16: 5,382 / 62; 2^18: 2,201 / 58; 2^19: 2,097 / 60; 2^20: 2,159 / 137; one
#: whole S×S matrix per head (the former reference): 9,372 / 68.
BLOCK_ELEMENTS = 2**18


def reference(q: Tensor, k: Tensor, num_heads: int, scale: float) -> Tensor:
    """[N, S] column means of softmax(scale·QKᵀ) from q, k [N, S, H·D], streamed over query blocks."""
    batch, seq, width = q.shape
    if batch == 0 or seq == 0:
        return q.new_zeros(batch, seq, dtype=torch.float32)
    head_dim = width // num_heads
    queries = q.reshape(batch, seq, num_heads, head_dim).transpose(1, 2).float() * scale  # [N, H, S, D]
    keys_t = k.reshape(batch, seq, num_heads, head_dim).permute(0, 2, 3, 1).float()  # [N, H, D, S]
    if num_heads * seq * seq <= BLOCK_ELEMENTS:  # short sequences: several whole ones per block
        group, rows = BLOCK_ELEMENTS // (num_heads * seq * seq), seq
    else:  # long ones: one at a time, ``rows`` query rows of all heads per block
        group, rows = 1, max(1, BLOCK_ELEMENTS // (num_heads * seq))
    received = []
    for first in range(0, batch, group):
        keys_block = keys_t[first : first + group]
        total = None  # running column sums, [group, S]
        for start in range(0, seq, rows):
            logits = torch.matmul(queries[first : first + group, :, start : start + rows], keys_block)
            block = torch.softmax(logits, dim=-1).sum(dim=(1, 2))
            total = block if total is None else total + block
        received.append(total)
    return torch.cat(received) / (num_heads * seq)


@torch.library.custom_op("vlmopt::received_attention", mutates_args=())
def received_attention(q: Tensor, k: Tensor, num_heads: int, scale: float) -> Tensor:
    if q.shape != k.shape or q.dim() != 3 or q.shape[-1] % num_heads:
        raise ValueError(f"received_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must be [N, S, H·D]")
    if q.is_cuda:
        from vlmopt.kernels.received_attention import received_attention_triton

        return received_attention_triton(q, k, num_heads, scale)
    return reference(q, k, num_heads, scale)


@received_attention.register_fake
def _(q: Tensor, k: Tensor, num_heads: int, scale: float) -> Tensor:
    return q.new_empty(q.shape[:2], dtype=torch.float32)


def flop_formula(q_shape, k_shape, num_heads: int, *args, **kwargs) -> int:
    """2·N·S²·(H·D): the QKᵀ product (registered with the FLOP counter by :mod:`vlmopt.flops`)."""
    batch, seq, width = q_shape
    return 2 * batch * seq * seq * width


def onnx_translation():
    """The op in standard ONNX (onnxscript, trace-only; imported lazily): ``MatMul`` + ``Softmax``,
    then ``ReduceSum`` over queries and heads (axes as constants, as TensorRT's parser wants)."""
    from onnxscript import opset18 as op

    float32 = 1  # onnx.TensorProto.FLOAT

    def received_attention(q, k, num_heads: int, scale: float):
        def heads(x):  # [N, S, H·D] -> [N, H, S, D], float32
            split = op.Reshape(op.Cast(x, to=float32), op.Concat(op.Shape(x, start=0, end=2), op.Constant(value_ints=[num_heads, -1]), axis=0))
            return op.Transpose(split, perm=[0, 2, 1, 3])

        logits = op.Mul(op.MatMul(heads(q), op.Transpose(heads(k), perm=[0, 1, 3, 2])), op.Constant(value_float=scale))
        received = op.ReduceSum(op.Softmax(logits, axis=-1), [1, 2], keepdims=0)  # [N, S]
        total = op.Cast(op.Mul(op.Shape(q, start=1, end=2), op.Constant(value_ints=[num_heads])), to=float32)
        return op.Div(received, total)

    return received_attention
