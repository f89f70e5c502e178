"""``vlmopt::received_attention`` — how much attention each token receives in one attention layer.

``score[n, j] = mean over heads h and queries i of softmax_j(scale · q_hi · k_hj)`` — the column
means of the attention matrix, computed from the layer's own Q/K projections so the model keeps
running SDPA (HF's eager attention would be needed to read attention weights otherwise). This is
HiPrune's token score (arXiv 2508.00553, §3.1); every query row, CLS included, votes.

Shapes
------
q, k    : [N, S, H·D] queries and keys of N independent sequences (images or frames)
returns : [N, S] float32 scores in [0, 1]; each row sums to 1
Kernels : the reference materialises one head's [N, S, S] probabilities at a time (CPU); on CUDA
          the Triton kernel in :mod:`vlmopt.kernels.received_attention` streams key and query
          blocks and never materialises them.
FLOPs   : 2·N·H·S²·D (the QKᵀ product), registered with the FLOP counter.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reference(q: Tensor, k: Tensor, num_heads: int, scale: float) -> Tensor:
    batch, seq, width = q.shape
    head_dim = width // num_heads
    qh = q.reshape(batch, seq, num_heads, head_dim).transpose(1, 2).float()
    kh = k.reshape(batch, seq, num_heads, head_dim).transpose(1, 2).float()
    received = torch.zeros(batch, seq, dtype=torch.float32, device=q.device)
    for head in range(num_heads):
        logits = torch.matmul(qh[:, head], kh[:, head].transpose(-1, -2)) * scale
        received += torch.softmax(logits, dim=-1).sum(dim=1)
    return received / (num_heads * seq)


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
