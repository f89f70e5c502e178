"""``vlmopt::lse_merge`` — combine attention computed over disjoint key sets by log-sum-exp weights.

If part ``p`` attended key set ``K_p`` and returned ``out_p`` (its softmax-weighted values) and
``lse_p = log Σ_{j∈K_p} exp(s_j)``, attention over the union of the (disjoint) ``K_p`` is

    lse = log Σ_p exp(lse_p),    out = Σ_p exp(lse_p − lse) · out_p.

APB-V (arXiv 2601.21444, https://arxiv.org/abs/2601.21444) uses it twice: the question block's
exact attention over the whole context, computed piecewise on every host, and distributed
decoding, where every host attends its local KV cache (the official code's ``update_out_and_lse``,
after ring-flash-attention, and Star Attention's phase-2 merge). A part whose ``lse`` is ``-inf``
(no visible key) contributes nothing, whatever its ``out`` holds; a row with no visible key in any
part gets ``out = 0`` and ``lse = -inf``.

Shapes
------
outs    : [P, B, H, S, D] partial outputs (any float dtype)
lses    : [P, B, H, S] their natural-log log-sum-exps (any float dtype; computed in float32)
returns : out [B, H, S, D] in outs' dtype, lse [B, H, S] float32
FLOPs   : 2·P·B·H·S·D (the weighted sum of the partial outputs; the per-row exp/log are not counted,
          as PyTorch's counter counts only matmul-like work).
ONNX    : ``ReduceMax`` + ``Exp`` + ``ReduceSum`` + ``Log`` + ``Where`` (axes as constants).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmopt.errors import InputError


def check_inputs(outs: Tensor, lses: Tensor) -> None:
    """Raise :class:`InputError` naming the problem when the shapes do not fit the op's contract."""
    if outs.dim() != 5 or lses.shape != outs.shape[:-1] or outs.shape[0] == 0:
        raise InputError(
            f"vlmopt::lse_merge: outs must be [P, B, H, S, D] with P >= 1 and lses [P, B, H, S] "
            f"(got outs {tuple(outs.shape)}, lses {tuple(lses.shape)}); stack the parts along a new dim 0"
        )
    if not (outs.dtype.is_floating_point and lses.dtype.is_floating_point):
        raise InputError(f"vlmopt::lse_merge: outs and lses must be floating (got {outs.dtype}, {lses.dtype})")


def reference(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Plain PyTorch, float32. Returns ``(out, lse)``."""
    lses = lses.float()
    top = lses.amax(dim=0)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)  # all parts empty: no NaN
    weights = torch.exp(lses - shift)  # [P, B, H, S]; exactly 0 for empty parts
    total = weights.sum(dim=0)
    lse = shift + torch.log(total)  # log(0) = -inf for rows no part sees
    weights = weights[..., None]
    contributions = torch.where(weights > 0, outs.float(), torch.zeros((), device=outs.device)) * weights
    out = contributions.sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    return out.to(outs.dtype), lse


@torch.library.custom_op("vlmopt::lse_merge", mutates_args=())
def lse_merge(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    check_inputs(outs, lses)
    return reference(outs, lses)


@lse_merge.register_fake
def _(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    check_inputs(outs, lses)
    return outs.new_empty(outs.shape[1:]), outs.new_empty(outs.shape[1:-1], dtype=torch.float32)


def flop_formula(outs_shape, lses_shape, *args, out_shape=None, **kwargs) -> int:
    """2·P·B·H·S·D: one multiply-add per element of the partial outputs."""
    parts, batch, heads, seq, head_dim = outs_shape
    return 2 * parts * batch * heads * seq * head_dim


def onnx_translation():
    """The op in standard ONNX (onnxscript, trace-only; imported lazily), computed in float32."""
    from onnxscript import opset18 as op

    float32 = 1  # onnx.TensorProto.FLOAT

    def lse_merge(outs, lses):
        lses = op.Cast(lses, to=float32)
        zero = op.Constant(value_float=0.0)
        top = op.ReduceMax(lses, [0], keepdims=1)
        shift = op.Where(op.Equal(top, op.Constant(value_float=float("-inf"))), zero, top)
        weights = op.Exp(op.Sub(lses, shift))
        total = op.ReduceSum(weights, [0], keepdims=0)
        lse = op.Add(op.Squeeze(shift, [0]), op.Log(total))
        weights = op.Unsqueeze(weights, [-1])
        kept = op.Where(op.Greater(weights, zero), op.Cast(outs, to=float32), zero)
        summed = op.ReduceSum(op.Mul(kept, weights), [0], keepdims=0)
        denominator = op.Where(op.Greater(total, zero), total, op.Constant(value_float=1.0))
        return op.CastLike(op.Div(summed, op.Unsqueeze(denominator, [-1])), outs), lse

    return lse_merge
