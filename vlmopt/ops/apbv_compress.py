"""``vlmopt::apbv_compress`` — APB-V's query-aware choice of the KV entries a block passes on.

APB-V (arXiv 2601.21444, https://arxiv.org/abs/2601.21444; ``thunlp/APB``,
``zigzag_lring_flash_attn.py``) scores every key of a host's context block by how much the
question attends it, without training (APB, its predecessor, used trained retaining heads):

1. average the question tokens' queries over the G query heads of each KV group and over the
   question tokens (the official code takes the mean of the per-token dot products; by linearity
   that equals the dot product with the mean query, which is what is computed here);
2. score key j of KV head g as the raw dot product ``q̄_g · k_{g,j}`` in float32 (no 1/sqrt(d),
   no softmax: only the ranking matters);
3. max-pool the scores along the sequence (width ``pool``, stride 1, padding ``pool // 2``, so a key
   next to a strong one is kept with it; the official width is 5);
4. keep the ``keep`` best keys per KV head (different heads keep different tokens).

The indices are returned **sorted ascending** (the official code does not re-sort; sorting keeps the
passing block in sequence order and makes the result deterministic). Ties (max-pooling makes
plateaus of equal scores) go to the lower index, as ONNX ``TopK`` specifies.

Shapes
------
q_query : [B, H, Lq, D] the question tokens' queries (RoPE applied, as the model computes them)
k_block : [B, Hkv, Lb, D] the block's keys; H % Hkv == 0 (query head h belongs to KV head h // G)
keep    : 0 <= keep <= Lb;  pool: odd, >= 1
returns : [B, Hkv, keep] int64, ascending along the last dim
FLOPs   : B·H·Lq·D (the mean) + 2·B·Hkv·Lb·D (the scores)
ONNX    : ``ReduceMean`` + ``MatMul`` + max-pool (``Pad`` + ``Slice`` + ``Max``) + ``TopK(sorted=1)``; ascending order by a second
          ``TopK`` over the negated indices cast to float (exact below 2**24 tokens), as in
          :mod:`vlmopt.ops.topk_indices`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmopt.errors import InputError
from vlmopt.ops._heads import check_grouped_heads


def check_inputs(q_query: Tensor, k_block: Tensor, keep: int, pool: int) -> None:
    """Raise :class:`InputError` naming the problem when the inputs do not fit the op's contract."""
    name = "vlmopt::apbv_compress"
    if q_query.dim() != 4 or k_block.dim() != 4:
        raise InputError(f"{name}: q_query must be [B, H, Lq, D] and k_block [B, Hkv, Lb, D] (got {tuple(q_query.shape)}, {tuple(k_block.shape)})")
    query_len = q_query.shape[2]
    check_grouped_heads(name, q_query, k_block, "q_query", "k_block")
    if query_len == 0:
        raise InputError(f"{name}: the question block is empty (Lq = 0); the compressor needs at least one question token")
    if not 0 <= keep <= k_block.shape[2]:
        raise InputError(f"{name}: keep={keep} must lie in [0, Lb={k_block.shape[2]}] (the block's length)")
    if pool < 1 or pool % 2 == 0:
        raise InputError(f"{name}: pool={pool} must be odd and >= 1 (stride-1 pooling with padding pool // 2 keeps the length)")


def pooled_scores(q_query: Tensor, k_block: Tensor, pool: int) -> Tensor:
    """``[B, Hkv, Lb]`` float32: the max-pooled raw scores the top-k ranks (steps 1–3)."""
    batch, heads, query_len, head_dim = q_query.shape
    kv_heads = k_block.shape[1]
    mean_query = q_query.float().reshape(batch, kv_heads, heads // kv_heads * query_len, head_dim).mean(dim=2)
    scores = torch.matmul(k_block.float(), mean_query[..., None])[..., 0]
    if pool == 1:
        return scores
    return F.max_pool1d(scores, kernel_size=pool, stride=1, padding=pool // 2)


def reference(q_query: Tensor, k_block: Tensor, keep: int, pool: int) -> Tensor:
    """Plain PyTorch: ``[B, Hkv, keep]`` int64 indices into the block, ascending."""
    scores = pooled_scores(q_query, k_block, pool)
    # A stable descending sort breaks ties towards the lower index (ONNX TopK's rule).
    best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.sort(best, dim=-1).values


@torch.library.custom_op("vlmopt::apbv_compress", mutates_args=())
def apbv_compress(q_query: Tensor, k_block: Tensor, keep: int, pool: int) -> Tensor:
    check_inputs(q_query, k_block, keep, pool)
    return reference(q_query, k_block, keep, pool)


@apbv_compress.register_fake
def _(q_query: Tensor, k_block: Tensor, keep: int, pool: int) -> Tensor:
    check_inputs(q_query, k_block, keep, pool)
    return k_block.new_empty((k_block.shape[0], k_block.shape[1], keep), dtype=torch.long)


def flop_formula(q_shape, k_shape, keep: int, pool: int, *args, out_shape=None, **kwargs) -> int:
    """B·H·Lq·D for the mean query plus 2·B·Hkv·Lb·D for the scores (pooling and top-k not counted)."""
    batch, heads, query_len, head_dim = q_shape
    _, kv_heads, block_len, _ = k_shape
    return batch * heads * query_len * head_dim + 2 * batch * kv_heads * block_len * head_dim


def onnx_translation():
    """The op in standard ONNX (onnxscript, trace-only; imported lazily)."""
    from onnxscript import opset18 as op

    float32, int64 = 1, 7  # onnx.TensorProto.FLOAT, INT64

    def apbv_compress(q_query, k_block, keep: int, pool: int):
        # [B, H, Lq, D] -> [B, Hkv, G·Lq, D]: a group's heads are adjacent, so one Reshape groups them.
        grouped = op.Concat(op.Shape(k_block, start=0, end=2), op.Constant(value_ints=[-1]), op.Shape(q_query, start=3, end=4), axis=0)
        mean_query = op.ReduceMean(op.Reshape(op.Cast(q_query, to=float32), grouped), [2], keepdims=1)  # [B, Hkv, 1, D]
        keys = op.Transpose(op.Cast(k_block, to=float32), perm=[0, 1, 3, 2])
        scores = op.Squeeze(op.MatMul(mean_query, keys), [2])  # [B, Hkv, Lb]
        if pool > 1:  # max-pool as Max over shifted Slices of a -inf-padded copy (MaxPool has an Indices output)
            radius = pool // 2
            padded = op.Pad(scores, [0, 0, radius, 0, 0, radius], op.Constant(value_float=float("-inf")))
            ends = [offset - (pool - 1) if offset < pool - 1 else 2**62 for offset in range(pool)]
            scores = op.Max(*(op.Slice(padded, [offset], [end], [2]) for offset, end in zip(range(pool), ends)))
        _, best = op.TopK(scores, [keep], axis=-1, largest=1, sorted=1)
        ascending, _ = op.TopK(op.Neg(op.Cast(best, to=float32)), [keep], axis=-1, largest=1, sorted=1)
        return op.Cast(op.Neg(ascending), to=int64)

    return apbv_compress
