"""``vlmopt::last_token_attention`` — how much the last token attends to each (masked) key.

HalfV's relevance probe (arXiv 2604.16462, "From Inheritance to Saturation"): the query of the
prompt's last token, taken from one decoder layer's own Q/K projections, scores the visual tokens by
``a_j = mean over heads h of softmax_{j ∈ mask}(scale · q_h · k_{g(h), j})``, where ``g(h)`` is the
key/value head that query head ``h`` shares under grouped-query attention. HalfV's
inherited-redundancy probe uses no scaling (``scale=1.0``); its saturation probe the usual
``1/sqrt(D)``.

RoPE: the op is agnostic. Whoever produces ``q_last`` and ``k`` (the adapter's hook on the layer)
decides whether they carry rotary position embeddings: HalfV's first probe reads them *without*
RoPE, its second *with* it (M-RoPE on Qwen2.5-VL). The op only takes dot products.

Shapes
------
q_last   : [B, H, D] the last token's queries, one row per query head
k        : [B, Hkv, S, D] keys; ``H % Hkv == 0`` (Hkv = H is plain multi-head attention)
key_mask : [B, S] bool, the keys that take part (e.g. the visual span); the softmax runs over them only
scale    : float multiplying the logits
returns  : [B, S] float32; each row sums to 1 over its masked keys, is 0 at unmasked keys, and is all
           zeros where a row has no masked key
FLOPs    : 2·B·H·S·D (the q·k dot products); the softmax and the mean are not counted.
ONNX     : ``MatMul`` of the grouped queries with the keys, ``Where`` of the float32 minimum at
           unmasked keys (finite, so a row without keys gives no NaN), ``Softmax``, ``Where`` of 0,
           ``ReduceMean`` over heads.

Logits and softmax are computed in float32 whatever the input dtype (the ranking HalfV builds on
these scores deserves full precision). The work is one [H, S] GEMV per sequence, so no Triton kernel:
on CUDA the reference is already a single batched matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmopt.errors import InputError
from vlmopt.ops._heads import check_grouped_heads


def _check(q_last: Tensor, k: Tensor, key_mask: Tensor) -> None:
    if q_last.dim() != 3 or k.dim() != 4:
        raise InputError(
            f"last_token_attention: q_last {tuple(q_last.shape)} must be [B, H, D] and k {tuple(k.shape)} "
            "[B, Hkv, S, D] (take the last query row and transpose keys to heads-first)"
        )
    batch = q_last.shape[0]
    check_grouped_heads("last_token_attention", q_last, k, "q_last", "k")
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (batch, k.shape[2]):
        raise InputError(
            f"last_token_attention: key_mask must be bool [B, S] = [{batch}, {k.shape[2]}], "
            f"got {key_mask.dtype} {tuple(key_mask.shape)}"
        )


def reference(q_last: Tensor, k: Tensor, key_mask: Tensor, scale: float) -> Tensor:
    batch, heads, head_dim = q_last.shape
    kv_heads = k.shape[1]
    grouped = q_last.float().reshape(batch, kv_heads, heads // kv_heads, head_dim)
    logits = torch.matmul(grouped, k.float().transpose(-1, -2)) * scale  # [B, Hkv, G, S]
    keep = key_mask[:, None, None, :]
    # A finite fill, not -inf: a row without masked keys then gives a uniform softmax (zeroed below)
    # rather than NaN, in PyTorch, onnxruntime and TensorRT alike.
    logits = torch.where(keep, logits, torch.finfo(torch.float32).min)
    probs = torch.where(keep, torch.softmax(logits, dim=-1), 0.0)
    return probs.mean(dim=(1, 2))


@torch.library.custom_op("vlmopt::last_token_attention", mutates_args=())
def last_token_attention(q_last: Tensor, k: Tensor, key_mask: Tensor, scale: float) -> Tensor:
    _check(q_last, k, key_mask)
    return reference(q_last, k, key_mask, scale)


@last_token_attention.register_fake
def _(q_last: Tensor, k: Tensor, key_mask: Tensor, scale: float) -> Tensor:
    _check(q_last, k, key_mask)
    return q_last.new_empty((q_last.shape[0], k.shape[2]), dtype=torch.float32)


def flop_formula(q_shape, k_shape, mask_shape, scale: float, *args, out_shape=None, **kwargs) -> int:
    """2·B·H·S·D: one multiply-add per query head, key and channel."""
    batch, heads, head_dim = q_shape
    return 2 * batch * heads * k_shape[2] * head_dim


def onnx_translation():
    """The op in standard ONNX (onnxscript, trace-only; imported lazily).

    Queries are reshaped to ``[B, Hkv, H/Hkv, D]`` so each group meets its shared key head in one
    ``MatMul`` (no key repeat); axes of ``Unsqueeze``/``ReduceMean`` are constants, as TensorRT's
    parser wants.
    """
    from onnxscript import opset18 as op

    float32 = 1  # onnx.TensorProto.FLOAT
    lowest = float(torch.finfo(torch.float32).min)

    def last_token_attention(q_last, k, key_mask, scale: float):
        query = op.Cast(q_last, to=float32)
        grouped_shape = op.Concat(
            op.Shape(q_last, start=0, end=1), op.Shape(k, start=1, end=2), op.Constant(value_ints=[-1]),
            op.Shape(q_last, start=2, end=3), axis=0,
        )
        grouped = op.Reshape(query, grouped_shape)  # [B, Hkv, G, D]
        keys = op.Transpose(op.Cast(k, to=float32), perm=[0, 1, 3, 2])  # [B, Hkv, D, S]
        logits = op.Mul(op.MatMul(grouped, keys), op.Constant(value_float=scale))
        keep = op.Unsqueeze(key_mask, op.Constant(value_ints=[1, 2]))  # [B, 1, 1, S]
        logits = op.Where(keep, logits, op.Constant(value_float=lowest))
        probs = op.Where(keep, op.Softmax(logits, axis=-1), op.Constant(value_float=0.0))
        return op.ReduceMean(probs, op.Constant(value_ints=[1, 2]), keepdims=0)

    return last_token_attention
