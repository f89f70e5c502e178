"""``vlmopt::evicted_mean`` — HERMES's long-term summary token: the mean of what a layer evicts.

HERMES (arXiv 2601.14724) folds every entry a long-term layer evicts into one summary token:
``V̄ = mean V_evicted`` and ``K̄ = mean K_evicted`` with the keys already moved to the summary's
position (:mod:`vlmopt.ops.rerotate_keys`). Evicted = the entries of ``[0, N)`` not in ``keep``
(an index ``N`` in ``keep`` is the summary slot itself and ignored). A layer that evicts nothing
gets zeros (its keep index does not point at the slot).

Shapes
------
keys, values : [L, H, N, D]
keep         : [L, K] int64, kept entries (values in [0, N])
returns      : (K̄, V̄), each [L, H, 1, D] in the inputs' dtype
FLOPs        : 2·L·H·N·D (masked sums).
ONNX         : none (a streaming-cache op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmopt.errors import InputError


def _check(keys: Tensor, values: Tensor, keep: Tensor) -> None:
    if keys.dim() != 4 or keys.shape != values.shape or keep.dim() != 2 or keep.shape[0] != keys.shape[0]:
        raise InputError(
            f"evicted_mean: keys {tuple(keys.shape)} and values {tuple(values.shape)} must be one [L, H, N, D] shape "
            f"and keep {tuple(keep.shape)} [L, K]"
        )


def reference(keys: Tensor, values: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    layers, _, entries, _ = keys.shape
    kept = torch.zeros(layers, entries + 1, dtype=torch.bool, device=keys.device).scatter(1, keep, True)[:, :entries]
    evicted = (~kept).float()[:, None, :, None]  # [L, 1, N, 1]
    count = evicted.sum(dim=2, keepdim=True).clamp_min(1.0)
    mean_k = (keys.float() * evicted).sum(dim=2, keepdim=True) / count
    mean_v = (values.float() * evicted).sum(dim=2, keepdim=True) / count
    return mean_k.to(keys.dtype), mean_v.to(values.dtype)


@torch.library.custom_op("vlmopt::evicted_mean", mutates_args=())
def evicted_mean(keys: Tensor, values: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    _check(keys, values, keep)
    return reference(keys, values, keep)


@evicted_mean.register_fake
def _(keys: Tensor, values: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    _check(keys, values, keep)
    shape = (keys.shape[0], keys.shape[1], 1, keys.shape[3])
    return keys.new_empty(shape), values.new_empty(shape)


def flop_formula(keys_shape, values_shape, keep_shape, *args, out_shape=None, **kwargs) -> int:
    """2·L·H·N·D: one masked multiply-add per key and value element."""
    layers, heads, entries, dim = keys_shape
    return 2 * layers * heads * entries * dim


onnx_translation = None
