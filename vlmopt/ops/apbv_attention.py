"""``vlmopt::apbv_attention`` — APB-V's anchor/passing-block attention on one (virtual) host.

APB-V (arXiv 2601.21444, https://arxiv.org/abs/2601.21444; code ``thunlp/APB``, the custom-mask
FlashAttention-2 fork ``flash_attn_apb``) splits a long context over hosts. Each host attends its
own context block together with a shared *anchor* (the first tokens of the context) and a *passing
block* (the compressed keys/values that earlier hosts selected with :mod:`vlmopt.ops.apbv_compress`).

Layout is ``[B, H, S, D]`` (batch, heads, sequence, head dim; the official kernel's is
``[B, S, H, D]``). Queries are ``[anchor | block]``, keys and values ``[passing | anchor | block]``:

- anchor query ``i < anchor_len`` sees anchor keys ``0..i`` only (causal, no passing keys);
- block query ``anchor_len + t`` sees every passing key, every anchor key and block keys ``0..t``.

With ``p = passing_len`` this is ``key j visible from query i  ⇔  j ≤ p + i  and  (i ≥ anchor_len or
j ≥ p)``: bottom-right-aligned causal attention with the passing keys hidden from the anchor rows.
``anchor_len = 0`` gives a block attending to a prefix (APB-V's second virtual host, whose anchor
then counts as passing keys); ``passing_len = 0`` gives plain causal attention.

Shapes
------
q       : [B, H, Sq, D], Sq = anchor_len + block_len
k, v    : [B, Hkv, Sk, D], Sk = passing_len + Sq; H % Hkv == 0 (GQA: query head h reads KV head
          h // (H / Hkv), as Hugging Face's ``repeat_kv``)
scale   : the logit scale (1/sqrt(D) for standard attention)
returns : out [B, H, Sq, D] in q's dtype, and lse [B, H, Sq] float32: the natural-log
          log-sum-exp of the scaled logits over each query's visible keys (every query sees at least
          its own key, so lse is finite), for merging with :mod:`vlmopt.ops.lse_merge`.
Kernels : CUDA tensors go to the Triton kernel in :mod:`vlmopt.kernels.apbv_attention` (flash-
          attention-style, the mask computed from indices); anything else to :func:`reference`, which
          materialises the [Sq, Sk] mask and fp32 logits.
FLOPs   : 4·B·H·D·(visible pairs), the pairs counted in closed form by :func:`visible_pairs`.
ONNX    : ``MatMul`` + ``Where`` (mask from ``Range``) + ``Softmax`` written as ``Exp(x − lse)`` with
          the log-sum-exp from ``ReduceMax``/``ReduceSum``/``Log``; GQA by ``Expand`` + ``Reshape``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmopt.errors import InputError
from vlmopt.ops._heads import check_grouped_heads


def visible_mask(query_len: int, key_len: int, anchor_len: int, passing_len: int, device=None) -> Tensor:
    """``[Sq, Sk]`` bool: ``True`` where query ``i`` may attend key ``j`` (see the module docstring)."""
    rows = torch.arange(query_len, device=device)[:, None]
    cols = torch.arange(key_len, device=device)[None, :]
    return (cols <= rows + passing_len) & ((rows >= anchor_len) | (cols >= passing_len))


def visible_pairs(anchor_len: int, passing_len: int, block_len: int) -> int:
    """Number of visible (query, key) pairs per (batch, head).

    The anchor rows see 1, 2, ..., a keys: a(a+1)/2. Block row t sees p + a + t + 1 keys: summed over
    t < L that is L(p + a) + L(L+1)/2.
    """
    a, p, length = anchor_len, passing_len, block_len
    return a * (a + 1) // 2 + length * (p + a) + length * (length + 1) // 2


def check_inputs(q: Tensor, k: Tensor, v: Tensor, anchor_len: int, passing_len: int) -> None:
    """Raise :class:`InputError` naming the problem when the shapes do not fit the op's contract."""
    name = "vlmopt::apbv_attention"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(f"{name}: q, k, v must be [B, H, S, D] (got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)})")
    if k.shape != v.shape:
        raise InputError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    query_len = q.shape[2]
    check_grouped_heads(name, q, k)
    if anchor_len < 0 or passing_len < 0 or anchor_len > query_len:
        raise InputError(
            f"{name}: need 0 <= anchor_len <= Sq and passing_len >= 0 (anchor_len={anchor_len}, "
            f"passing_len={passing_len}, Sq={query_len})"
        )
    if k.shape[2] != passing_len + query_len:
        raise InputError(
            f"{name}: keys must be [passing | anchor | block]: Sk = passing_len + Sq = "
            f"{passing_len} + {query_len}, got Sk = {k.shape[2]}"
        )
    if not (q.dtype == k.dtype == v.dtype and q.dtype.is_floating_point):
        raise InputError(f"{name}: q, k, v must share one floating dtype (got {q.dtype}, {k.dtype}, {v.dtype})")


def masked_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, visible: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention of q [B, H, Sq, D] over k, v [B, H_kv, Sk, D] where ``visible`` (broadcast to
    [B, H, Sq, Sk]; None = every key) allows, in float32: ``(out [B, H, Sq, D] in q's dtype, lse
    [B, H, Sq])``. A row that sees no key gets lse = −inf (its out is 0; lse_merge drops it)."""
    group = q.shape[1] // k.shape[1]
    keys, values = k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    logits = torch.matmul(q.float(), keys.transpose(-1, -2)) * scale
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    return torch.matmul(probs, values).to(q.dtype), lse


def reference(q: Tensor, k: Tensor, v: Tensor, anchor_len: int, passing_len: int, scale: float) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: boolean mask, fp32 logits and softmax. Returns ``(out, lse)``."""
    mask = visible_mask(q.shape[2], k.shape[2], anchor_len, passing_len, device=q.device)
    return masked_attention(q, k, v, scale, mask)


@torch.library.custom_op("vlmopt::apbv_attention", mutates_args=())
def apbv_attention(q: Tensor, k: Tensor, v: Tensor, anchor_len: int, passing_len: int, scale: float) -> tuple[Tensor, Tensor]:
    check_inputs(q, k, v, anchor_len, passing_len)
    if q.is_cuda:
        from vlmopt.kernels.apbv_attention import apbv_attention_triton

        return apbv_attention_triton(q, k, v, anchor_len, passing_len, scale)
    return reference(q, k, v, anchor_len, passing_len, scale)


@apbv_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, anchor_len: int, passing_len: int, scale: float) -> tuple[Tensor, Tensor]:
    check_inputs(q, k, v, anchor_len, passing_len)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def flop_formula(q_shape, k_shape, v_shape, anchor_len: int, passing_len: int, *args, out_shape=None, **kwargs) -> int:
    """4·B·H·D·(visible pairs): 2·D for the logit and 2·D for the value product of each pair."""
    batch, heads, query_len, head_dim = q_shape
    return 4 * batch * heads * head_dim * visible_pairs(anchor_len, passing_len, query_len - anchor_len)


def onnx_translation():
    """The op in standard ONNX (onnxscript, trace-only; imported lazily), computed in float32."""
    from onnxscript import opset18 as op

    float32 = 1  # onnx.TensorProto.FLOAT

    def apbv_attention(q, k, v, anchor_len: int, passing_len: int, scale: float):
        # GQA: [B, Hkv, Sk, D] -> [B, Hkv, G, Sk, D] -> [B, H, Sk, D]; head h reads KV head h // G.
        group = op.Div(op.Shape(q, start=1, end=2), op.Shape(k, start=1, end=2))
        expanded = op.Concat(op.Shape(k, start=0, end=2), group, op.Shape(k, start=2, end=4), axis=0)
        merged = op.Concat(op.Shape(q, start=0, end=2), op.Shape(k, start=2, end=4), axis=0)

        def repeat_heads(x):
            return op.Reshape(op.Expand(op.Unsqueeze(op.Cast(x, to=float32), [2]), expanded), merged)

        keys, values = repeat_heads(k), repeat_heads(v)
        zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
        rows = op.Unsqueeze(op.Range(zero, op.Squeeze(op.Shape(q, start=2, end=3), [0]), one), [1])  # [Sq, 1]
        cols = op.Unsqueeze(op.Range(zero, op.Squeeze(op.Shape(k, start=2, end=3), [0]), one), [0])  # [1, Sk]
        passing = op.Constant(value_int=passing_len)
        causal = op.LessOrEqual(cols, op.Add(rows, passing))
        hidden = op.And(op.Less(rows, op.Constant(value_int=anchor_len)), op.Less(cols, passing))
        visible = op.And(causal, op.Not(hidden))
        logits = op.Mul(op.MatMul(op.Cast(q, to=float32), op.Transpose(keys, perm=[0, 1, 3, 2])), op.Constant(value_float=scale))
        logits = op.Where(visible, logits, op.Constant(value_float=float("-inf")))
        row_max = op.ReduceMax(logits, [-1], keepdims=1)  # finite: every query sees its own key
        lse = op.Add(row_max, op.Log(op.ReduceSum(op.Exp(op.Sub(logits, row_max)), [-1], keepdims=1)))
        out = op.MatMul(op.Exp(op.Sub(logits, lse)), values)
        return op.CastLike(out, q), op.Squeeze(lse, [-1])

    return apbv_attention
