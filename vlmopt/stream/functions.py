"""Python functions the chunk graph's KV-tier nodes call (one ``call_function`` node each).

The stream's cache is a HF ``DynamicCache`` of batch 1 whose layers all hold the same number of
entries (a KV-tier pass keeps the same count in every layer); these functions read it as stacked
``[L, H, N, D]`` tensors, gather what a layer keeps, and write the result back.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cache_tensors(cache) -> tuple[Tensor, Tensor]:
    """(keys, values), each [L, Hkv, N, D]: every layer's cached entries (batch 1)."""
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys, values


def write_cache(cache, keys: Tensor, values: Tensor) -> Tensor:
    """Replace every layer's entries with ``keys`` / ``values`` [L, Hkv, N', D]; returns [L] lengths."""
    for index, layer in enumerate(cache.layers):
        layer.keys = keys[index : index + 1].contiguous()
        layer.values = values[index : index + 1].contiguous()
    return torch.full((len(cache.layers),), keys.shape[2], dtype=torch.long, device=keys.device)


def truncate_cache(cache, length: int) -> None:
    """Drop every layer's entries from ``length`` on (the question and answer after ``ask``)."""
    for layer in cache.layers:
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


def layer_keys(keys: Tensor, layer: int) -> Tensor:
    """[1, Hkv, N, D]: one layer of the stacked keys."""
    return keys[layer : layer + 1]




def summary_positions(positions: Tensor, keep: Tensor) -> Tensor:
    """[L, P, 1] the position of each layer's summary token: one past the largest position (any axis)
    of its kept entries (``keep`` [L, K] into ``positions`` [L, P, N]; index N is the summary slot)."""
    entries = positions.shape[2]
    real = keep < entries
    picked = positions.amax(dim=1).gather(1, keep.clamp_max(entries - 1))  # [L, K]
    top = torch.where(real, picked, torch.full_like(picked, -1)).amax(dim=1) + 1  # [L]
    return top[:, None, None].expand(-1, positions.shape[1], 1).contiguous()


def rotary_position_ids(positions: Tensor, mrope: bool) -> Tensor:
    """Position ids [L, P, N] as the rotary module reads them, one row of the batch per layer:
    [3, L, N] for M-RoPE, [L, N] for 1-D RoPE."""
    return positions.permute(1, 0, 2) if mrope else positions[:, 0]


def gather_kept(
    keys: Tensor, values: Tensor, positions: Tensor, keep: Tensor, summary_k: Tensor, summary_v: Tensor, target: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(keys [L, H, K, D], values, positions [L, P, K]): each layer's kept entries, in ``keep`` order,
    where index N (one past the cache) is the layer's summary token (``summary_k/v`` [L, H, 1, D] at
    ``target`` [L, P, 1])."""
    keys = torch.cat([keys, summary_k], dim=2)
    values = torch.cat([values, summary_v], dim=2)
    positions = torch.cat([positions, target], dim=2)
    index = keep[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
    kept_positions = positions.gather(2, keep[:, None, :].expand(-1, positions.shape[1], -1))
    return keys.gather(2, index), values.gather(2, index), kept_positions


def visual_span(keys: Tensor, prefix: int) -> Tensor:
    """[L, V] zeros shaped like the visual entries of the stacked ``keys`` [L, H, N, D]."""
    return keys.new_zeros((keys.shape[0], keys.shape[2] - prefix), dtype=torch.float32)
