"""``vlmopt::pseudo_query_attention`` — attention a layer's cached keys receive from generic pseudo-queries.

HERMES (arXiv 2601.14724) scores the cached visual tokens of decoder layer ℓ by the attention that
text-only pseudo-queries ("describe the current scene…", "summarize the video…") pay them:
``a_j = mean over query heads h and pseudo-query rows i of softmax_j(scale · q_{h,i} · k_{g(h),j})``,
the softmax running over the *whole* cache (system prompt included), then the columns from ``start``
(the first visual entry) kept. ``g(h)`` is the key head query head ``h`` shares under grouped-query
attention. The queries come from the fast path ``Q = W_q · RMSNorm(Embed(pseudo-query))`` with the
layer's rotary embedding at the positions after the cache (the caller's business).

Shapes
------
q       : [L, H, Q, D] queries of L layers (Q pseudo-query rows)
k       : [L, Hkv, N, D] the layers' cached keys; ``H % Hkv == 0``
start   : int, first scored cache entry (0 ≤ start ≤ N)
scale   : float multiplying the logits
returns : [L, N - start] float32
FLOPs   : 2·L·H·Q·N·D (the dot products).
ONNX    : none (a streaming-cache op; the stream runs in PyTorch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmopt.errors import InputError
from vlmopt.ops._heads import check_grouped_heads


def _check(q: Tensor, k: Tensor, start: int) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise InputError(
            f"pseudo_query_attention: q {tuple(q.shape)} must be [L, H, Q, D] and k {tuple(k.shape)} [L, Hkv, N, D]"
        )
    check_grouped_heads("pseudo_query_attention", q, k)
    if not 0 <= start <= k.shape[2]:
        raise InputError(f"pseudo_query_attention: start={start} must be in [0, {k.shape[2]}]")


def reference(q: Tensor, k: Tensor, start: int, scale: float) -> Tensor:
    layers, heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.float().reshape(layers, kv_heads, (heads // kv_heads) * rows, dim)
    probs = torch.softmax(torch.matmul(grouped, k.float().transpose(-1, -2)) * scale, dim=-1)
    return probs.mean(dim=(1, 2))[:, start:]


@torch.library.custom_op("vlmopt::pseudo_query_attention", mutates_args=())
def pseudo_query_attention(q: Tensor, k: Tensor, start: int, scale: float) -> Tensor:
    _check(q, k, start)
    return reference(q, k, start, scale)


@pseudo_query_attention.register_fake
def _(q: Tensor, k: Tensor, start: int, scale: float) -> Tensor:
    _check(q, k, start)
    return q.new_empty((q.shape[0], k.shape[2] - start), dtype=torch.float32)


def flop_formula(q_shape, k_shape, start: int, scale: float, *args, out_shape=None, **kwargs) -> int:
    """2·L·H·Q·N·D: one multiply-add per query head, query row, key and channel."""
    layers, heads, rows, dim = q_shape
    return 2 * layers * heads * rows * k_shape[2] * dim


onnx_translation = None
