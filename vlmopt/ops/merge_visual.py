"""``vlmopt::merge_visual`` — write visual token features into their slots of the LLM sequence.

The Hugging Face models do this with ``inputs_embeds.masked_scatter(image_mask, features)``; vlmopt
writes by explicit flat positions instead, so a pruning pass can merge only the kept tokens (their
slots are a subset of the image placeholders) and the op exports to ONNX as one ``ScatterND``.

Shapes
------
embeds    : [B, S, D]  token embeddings of the whole prompt
features  : [T, D'] or [N, P, D'] (flattened to [T, D']), D' ≥ D  visual features, in the order of
            ``positions``; only the first D channels are written (more channels may ride along
            with a token, such as the DeepStack features a model adds in later layers)
positions : [T] int64  flat slot index ``b * S + s`` of each feature
returns   : [B, S, D]  a copy of ``embeds`` with the T slots overwritten (cast to ``embeds.dtype``)
"""

from __future__ import annotations

import torch
from torch import Tensor


def reference(embeds: Tensor, features: Tensor, positions: Tensor) -> Tensor:
    batch, seq, dim = embeds.shape
    flat = embeds.reshape(batch * seq, dim).clone()
    flat[positions] = features.reshape(-1, features.shape[-1])[:, :dim].to(flat.dtype)
    return flat.view(batch, seq, dim)


@torch.library.custom_op("vlmopt::merge_visual", mutates_args=())
def merge_visual(embeds: Tensor, features: Tensor, positions: Tensor) -> Tensor:
    if features.shape[-1] < embeds.shape[-1]:
        raise ValueError(
            f"merge_visual: visual features of width {features.shape[-1]} for embeddings of width {embeds.shape[-1]}; "
            "the projector's output width must be the language model's hidden size"
        )
    if features.numel() // features.shape[-1] != positions.numel():
        raise ValueError(
            f"merge_visual: {features.numel() // features.shape[-1]} visual features for "
            f"{positions.numel()} placeholder slots; the prompt's image tokens and the images do not match"
        )
    return reference(embeds, features, positions)


@merge_visual.register_fake
def _(embeds: Tensor, features: Tensor, positions: Tensor) -> Tensor:
    return torch.empty_like(embeds)


def _setup_context(ctx, inputs, output) -> None:
    embeds, features, positions = inputs
    ctx.save_for_backward(positions)
    ctx.feature_shape = features.shape
    ctx.feature_dtype = features.dtype


def _backward(ctx, grad: Tensor):
    (positions,) = ctx.saved_tensors
    batch, seq, dim = grad.shape
    flat = grad.reshape(batch * seq, dim)
    width = ctx.feature_shape[-1]
    grad_rows = flat[positions].to(ctx.feature_dtype)
    if width > dim:  # the channels riding along get no gradient from the merge
        grad_rows = torch.cat([grad_rows, grad_rows.new_zeros(grad_rows.shape[0], width - dim)], dim=-1)
    grad_features = grad_rows.reshape(ctx.feature_shape)
    grad_embeds = flat.clone()
    grad_embeds[positions] = 0
    return grad_embeds.view(batch, seq, dim), grad_features, None


merge_visual.register_autograd(_backward, setup_context=_setup_context)


#: A scatter, no arithmetic.
flop_formula = None


def onnx_translation():
    """The op in standard ONNX (onnxscript, trace-only; imported lazily): one ``ScatterND``."""
    from onnxscript import opset18 as op

    def merge_visual(embeds, features, positions):
        rows_of = op.Concat(op.Constant(value_ints=[-1]), op.Shape(embeds, start=2), axis=0)
        flat = op.Reshape(embeds, rows_of)
        wide = op.Reshape(features, op.Concat(op.Constant(value_ints=[-1]), op.Shape(features, start=-1), axis=0))
        first = op.Slice(wide, op.Constant(value_ints=[0]), op.Shape(embeds, start=2), op.Constant(value_ints=[1]))
        rows = op.CastLike(first, flat)
        merged = op.ScatterND(flat, op.Unsqueeze(positions, op.Constant(value_ints=[1])), rows)
        return op.Reshape(merged, op.Shape(embeds))

    return merge_visual
