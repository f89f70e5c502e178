"""``vlmopt::rerotate_keys`` — move rotary-embedded keys to other positions without recomputing them.

A key rotated to position ``p`` (RoPE, or Qwen2.5-VL's M-RoPE, whose frequencies each read one axis)
becomes the key at ``p + Δ`` when rotated once more by ``Δ``, because the per-frequency rotations
compose: ``k(p + Δ) = k(p) · cos(Δθ) + rotate_half(k(p)) · sin(Δθ)``. HERMES (arXiv 2601.14724)
uses this for the long-term summary token (evicted keys moved to the summary's position before
averaging) and for position re-indexing (kept keys moved to their compacted positions). ``cos`` and
``sin`` are the model's own rotary embedding evaluated at the deltas, so the op is family-agnostic.

Shapes
------
keys    : [L, H, N, D] cached keys (rotary applied)
cos/sin : [L, N, D] rotary embedding at the position deltas
returns : [L, H, N, D] in ``keys``' dtype (computed in float32)
FLOPs   : 3·L·H·N·D (two products and a sum per element).
ONNX    : none (a streaming-cache op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmopt.errors import InputError


def _check(keys: Tensor, cos: Tensor, sin: Tensor) -> None:
    expected = (keys.shape[0], keys.shape[2], keys.shape[3]) if keys.dim() == 4 else None
    if expected is None or tuple(cos.shape) != expected or tuple(sin.shape) != expected or keys.shape[-1] % 2:
        raise InputError(
            f"rerotate_keys: keys {tuple(keys.shape)} must be [L, H, N, D] (D even) and cos/sin {tuple(cos.shape)} "
            f"{tuple(sin.shape)} [L, N, D]"
        )


def reference(keys: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = keys.shape[-1] // 2
    k = keys.float()
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k * cos.float()[:, None] + rotated * sin.float()[:, None]).to(keys.dtype)


@torch.library.custom_op("vlmopt::rerotate_keys", mutates_args=())
def rerotate_keys(keys: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    _check(keys, cos, sin)
    return reference(keys, cos, sin)


@rerotate_keys.register_fake
def _(keys: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    _check(keys, cos, sin)
    return torch.empty_like(keys)


def flop_formula(keys_shape, cos_shape, sin_shape, *args, out_shape=None, **kwargs) -> int:
    """3·L·H·N·D: two products and a sum per key element."""
    layers, heads, entries, dim = keys_shape
    return 3 * layers * heads * entries * dim


onnx_translation = None
