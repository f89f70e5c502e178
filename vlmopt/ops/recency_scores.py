"""``vlmopt::recency_scores`` — HERMES's recency prior over the cached visual entries.

HERMES (arXiv 2601.14724): ``r_j = exp(-k · (V-1-j) / (V-1))`` for the visual entry ``j`` of ``V``
in cache order (the newest scores 1, the oldest ``exp(-k)``), with a per-layer sharpness ``k``
(sensory layers k = 20, working layers interpolate towards the long-term tier).

Shapes
------
like      : [L, V] any tensor with the scores' shape (only its shape and device are read)
sharpness : list of L floats ``k_ℓ`` (≥ 0)
returns   : [L, V] float32
FLOPs     : none counted (an elementwise exponential of an index).
ONNX      : none (a streaming-cache op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmopt.errors import InputError


def _check(like: Tensor, sharpness: list[float]) -> None:
    if like.dim() != 2 or len(sharpness) != like.shape[0]:
        raise InputError(
            f"recency_scores: like {tuple(like.shape)} must be [L, V] with one sharpness per layer (got {len(sharpness)})"
        )


def reference(like: Tensor, sharpness: list[float]) -> Tensor:
    visual = like.shape[1]
    age = torch.arange(visual - 1, -1, -1, device=like.device, dtype=torch.float32) / max(visual - 1, 1)
    rates = torch.tensor(sharpness, device=like.device, dtype=torch.float32)[:, None]
    return torch.exp(-rates * age[None, :])


@torch.library.custom_op("vlmopt::recency_scores", mutates_args=())
def recency_scores(like: Tensor, sharpness: list[float]) -> Tensor:
    _check(like, sharpness)
    return reference(like, sharpness)


@recency_scores.register_fake
def _(like: Tensor, sharpness: list[float]) -> Tensor:
    _check(like, sharpness)
    return like.new_empty(like.shape, dtype=torch.float32)


flop_formula = None
onnx_translation = None
