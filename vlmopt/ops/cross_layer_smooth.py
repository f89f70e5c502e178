"""``vlmopt::cross_layer_smooth`` — HERMES's top-down smoothing of memory scores across layers.

HERMES (arXiv 2601.14724): ``s^{L-1} = raw^{L-1}``; ``s^ℓ = (1 - γ_ℓ) · raw^ℓ + γ_ℓ · s^{ℓ+1}`` going
down from the last layer (γ = 0.4 long-term, 0.3 working, 0.1 sensory), so a layer's choice leans on
the deeper layers' without copying them. Every layer scores the same V entries (a HERMES cache holds
the same count in every layer).

Shapes
------
raw     : [L, V] per-layer scores
gammas  : list of L floats in [0, 1] (the last layer's is not used)
returns : [L, V] float32
FLOPs   : none counted (elementwise).
ONNX    : none (a streaming-cache op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmopt.errors import InputError


def _check(raw: Tensor, gammas: list[float]) -> None:
    if raw.dim() != 2 or len(gammas) != raw.shape[0]:
        raise InputError(f"cross_layer_smooth: raw {tuple(raw.shape)} must be [L, V] with one gamma per layer (got {len(gammas)})")


def reference(raw: Tensor, gammas: list[float]) -> Tensor:
    rows = [raw[-1].float()]
    for layer in range(raw.shape[0] - 2, -1, -1):
        rows.append((1 - gammas[layer]) * raw[layer].float() + gammas[layer] * rows[-1])
    return torch.stack(rows[::-1])


@torch.library.custom_op("vlmopt::cross_layer_smooth", mutates_args=())
def cross_layer_smooth(raw: Tensor, gammas: list[float]) -> Tensor:
    _check(raw, gammas)
    return reference(raw, gammas)


@cross_layer_smooth.register_fake
def _(raw: Tensor, gammas: list[float]) -> Tensor:
    _check(raw, gammas)
    return raw.new_empty(raw.shape, dtype=torch.float32)


flop_formula = None
onnx_translation = None
