"""``vlmopt::tier_keep_index`` — which cache entries each layer keeps: the prefix, then its top visual entries.

The selection step of the KV-tier machinery (HERMES, arXiv 2601.14724, and the eviction baselines on
the same machinery): every layer keeps the ``prefix`` entries (the system prompt, never evicted)
and, when its ``V`` visual entries exceed ``budget``, its ``budget`` best-scoring ones, in cache
order. A layer with ``summary[ℓ]`` (HERMES's long-term tier) keeps ``budget - 1`` and points its
last kept slot at ``N`` — the entry one past the cache, where the caller appends the summary of
what the layer evicts. Below the budget every entry is kept (``arange(N)``), so a budget above the
stream's length changes nothing.

Shapes
------
scores  : [L, V] per-layer scores of the visual entries (higher = keep)
prefix  : int, entries before the visual span (kept)
budget  : int ≥ 1, visual entries a layer holds
summary : list of L bools
returns : [L, prefix + min(V, budget)] int64, ascending per row; values in [0, prefix + V]
FLOPs   : none counted (a top-k and a sort).
ONNX    : none (a streaming-cache op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmopt.errors import InputError


def _check(scores: Tensor, prefix: int, budget: int, summary: list[bool]) -> None:
    if scores.dim() != 2 or len(summary) != scores.shape[0]:
        raise InputError(f"tier_keep_index: scores {tuple(scores.shape)} must be [L, V] with one summary flag per layer")
    if prefix < 0 or budget < 1:
        raise InputError(f"tier_keep_index: prefix={prefix} must be ≥ 0 and budget={budget} ≥ 1")


def reference(scores: Tensor, prefix: int, budget: int, summary: list[bool]) -> Tensor:
    layers, visual = scores.shape
    device = scores.device
    if visual <= budget:
        return torch.arange(prefix + visual, device=device).expand(layers, -1).contiguous()
    head = torch.arange(prefix, device=device)
    rows = []
    for layer in range(layers):
        count = budget - 1 if summary[layer] else budget
        top = torch.topk(scores[layer].float(), count, sorted=False).indices.sort().values + prefix
        tail = torch.full((1,), prefix + visual, device=device, dtype=torch.long) if summary[layer] else top[:0]
        rows.append(torch.cat([head, top, tail]))
    return torch.stack(rows)


@torch.library.custom_op("vlmopt::tier_keep_index", mutates_args=())
def tier_keep_index(scores: Tensor, prefix: int, budget: int, summary: list[bool]) -> Tensor:
    _check(scores, prefix, budget, summary)
    return reference(scores, prefix, budget, summary)


@tier_keep_index.register_fake
def _(scores: Tensor, prefix: int, budget: int, summary: list[bool]) -> Tensor:
    _check(scores, prefix, budget, summary)
    return scores.new_empty((scores.shape[0], prefix + min(scores.shape[1], budget)), dtype=torch.long)


flop_formula = None
onnx_translation = None
