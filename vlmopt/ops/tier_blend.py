"""``vlmopt::tier_blend`` — HERMES's per-layer memory score: min-max normalised attention and recency, blended.

HERMES (arXiv 2601.14724): ``raw^ℓ = (1 - α_ℓ) · minmax(a^ℓ) + α_ℓ · minmax(r^ℓ)``, where
``minmax(x) = (x - min x) / (max x - min x)`` over the layer's visual entries (0 where they are all
equal). Sensory layers take α = 1 (recency only), long-term layers α = 0 (attention only), working
layers a depth-dependent mix (the family schedules of :mod:`vlmopt.passes.hermes`).

Shapes
------
attention : [L, V] pseudo-query attention of each layer's visual entries
recency   : [L, V] recency prior
alphas    : list of L floats in [0, 1]
returns   : [L, V] float32 in [0, 1]
FLOPs     : none counted (elementwise).
ONNX      : none (a streaming-cache op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmopt.errors import InputError


def _check(attention: Tensor, recency: Tensor, alphas: list[float]) -> None:
    if attention.dim() != 2 or attention.shape != recency.shape or len(alphas) != attention.shape[0]:
        raise InputError(
            f"tier_blend: attention {tuple(attention.shape)} and recency {tuple(recency.shape)} must both be [L, V] "
            f"with one alpha per layer (got {len(alphas)})"
        )


def minmax(x: Tensor) -> Tensor:
    """Each row of ``x`` [L, V] scaled to [0, 1] (rows of equal values become 0)."""
    low = x.amin(dim=-1, keepdim=True)
    span = x.amax(dim=-1, keepdim=True) - low
    return torch.where(span > 0, (x - low) / span.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(x))


def reference(attention: Tensor, recency: Tensor, alphas: list[float]) -> Tensor:
    if attention.shape[1] == 0:
        return attention.float()
    alpha = torch.tensor(alphas, device=attention.device, dtype=torch.float32)[:, None]
    return (1 - alpha) * minmax(attention.float()) + alpha * minmax(recency.float())


@torch.library.custom_op("vlmopt::tier_blend", mutates_args=())
def tier_blend(attention: Tensor, recency: Tensor, alphas: list[float]) -> Tensor:
    _check(attention, recency, alphas)
    return reference(attention, recency, alphas)


@tier_blend.register_fake
def _(attention: Tensor, recency: Tensor, alphas: list[float]) -> Tensor:
    _check(attention, recency, alphas)
    return attention.new_empty(attention.shape, dtype=torch.float32)


flop_formula = None
onnx_translation = None
