"""``vlmopt::compact_positions`` — HERMES's position re-indexing of a compressed cache.

After eviction the kept visual entries keep their original position ids (gaps where evicted
entries were). HERMES (arXiv 2601.14724) re-indexes them: *eager* at every compression (offline
benchmarks), *lazy* only once a layer's largest position passes a limit (streaming: keep ids until
the range nears ``max_position_embeddings``). Re-indexing maps each position axis of a layer's
visual entries to dense ranks starting right after the prefix (Qwen2.5-VL: per-axis rank remap of
t / h / w; 1-D RoPE: a plain ``arange``), keeping their order; the prefix never moves. The caller
re-rotates the kept keys by the position change (:mod:`vlmopt.ops.rerotate_keys`).

Shapes
------
positions : [L, P, N] int64 position ids of each layer's cache entries (P = 3 for M-RoPE, 1 for RoPE)
prefix    : int, entries before the visual span
limit     : int; a layer is re-indexed when its largest position exceeds it (-1: always, eager)
returns   : [L, P, N] int64
FLOPs     : none counted (index bookkeeping).
ONNX      : none (a streaming-cache op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmopt.errors import InputError


def _check(positions: Tensor, prefix: int) -> None:
    if positions.dim() != 3 or positions.dtype != torch.long or not 0 <= prefix <= positions.shape[2]:
        raise InputError(
            f"compact_positions: positions must be int64 [L, P, N] with 0 ≤ prefix ≤ N, got {positions.dtype} "
            f"{tuple(positions.shape)} and prefix={prefix}"
        )


def reference(positions: Tensor, prefix: int, limit: int) -> Tensor:
    out = positions.clone()
    if positions.shape[2] == prefix:
        return out
    for layer in range(positions.shape[0]):
        if limit >= 0 and int(positions[layer].max()) <= limit:
            continue
        base = int(positions[layer, :, :prefix].max()) + 1 if prefix else 0
        for axis in range(positions.shape[1]):
            _, ranks = torch.unique(positions[layer, axis, prefix:], sorted=True, return_inverse=True)
            out[layer, axis, prefix:] = base + ranks
    return out


@torch.library.custom_op("vlmopt::compact_positions", mutates_args=())
def compact_positions(positions: Tensor, prefix: int, limit: int) -> Tensor:
    _check(positions, prefix)
    return reference(positions, prefix, limit)


@compact_positions.register_fake
def _(positions: Tensor, prefix: int, limit: int) -> Tensor:
    _check(positions, prefix)
    return torch.empty_like(positions)


flop_formula = None
onnx_translation = None
