"""Shape checks that attention-shaped ops share (this module registers no op)."""

from __future__ import annotations

from torch import Tensor

from vlmopt.errors import InputError


def check_grouped_heads(op: str, queries: Tensor, keys: Tensor, queries_name: str = "q", keys_name: str = "k") -> None:
    """Raise :class:`InputError` unless ``queries`` [B, H, ..., D] and ``keys`` [B, Hkv, ..., D] share the
    batch and the head dim and ``H`` is a multiple of ``Hkv`` (grouped-query attention)."""
    if keys.shape[0] != queries.shape[0] or keys.shape[-1] != queries.shape[-1]:
        raise InputError(
            f"{op}: {keys_name} {tuple(keys.shape)} must share {queries_name}'s batch and head dim "
            f"({queries_name} {tuple(queries.shape)})"
        )
    if keys.shape[1] == 0 or queries.shape[1] % keys.shape[1]:
        raise InputError(
            f"{op}: {queries.shape[1]} query heads are not a multiple of {keys.shape[1]} key heads "
            "(grouped-query attention needs H % Hkv == 0)"
        )
