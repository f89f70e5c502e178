"""``vlmopt::sequence_keep_index`` — which slots of the LLM sequence survive visual-token pruning.

A slot survives if it is text, or a visual slot whose token was kept. Kept slots stay in their
original order (so causal attention over them is unchanged); each row is right-aligned into
``out_len`` slots and left-padded with ``-1``, which matches the left-padding convention of
batched generation.

Shapes
------
visual_positions : [T]  int64 flat slots ``b * S + s`` of all visual tokens
kept_positions   : [T'] int64 flat slots of the kept visual tokens (a subset of the above)
returns          : [B, out_len] int64 sequence positions per row, ascending, -1 = padding
ONNX             : ScatterND for the flags, then fixed-k ``TopK(sorted=1)`` on
                   ``flag * S + position`` (kept slots rank above dropped ones), reversed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reference(
    visual_positions: Tensor, kept_positions: Tensor, batch: int, seq_len: int, out_len: int
) -> Tensor:
    device = visual_positions.device
    flags = torch.ones(batch * seq_len, dtype=torch.long, device=device)
    flags[visual_positions] = 0
    flags[kept_positions] = 1
    flags = flags.view(batch, seq_len)
    if int(flags.sum(1).max()) > out_len:
        raise ValueError(
            f"sequence_keep_index: a row keeps {int(flags.sum(1).max())} slots but out_len is {out_len}"
        )
    key = flags * seq_len + torch.arange(seq_len, device=device)
    values, index = torch.topk(key, out_len, dim=1, largest=True, sorted=True)
    values, index = values.flip(1), index.flip(1)
    return torch.where(values >= seq_len, index, torch.full_like(index, -1))


@torch.library.custom_op("vlmopt::sequence_keep_index", mutates_args=())
def sequence_keep_index(
    visual_positions: Tensor, kept_positions: Tensor, batch: int, seq_len: int, out_len: int
) -> Tensor:
    return reference(visual_positions, kept_positions, batch, seq_len, out_len)


@sequence_keep_index.register_fake
def _(visual_positions: Tensor, kept_positions: Tensor, batch: int, seq_len: int, out_len: int) -> Tensor:
    return visual_positions.new_empty((batch, out_len))


#: Index bookkeeping, no arithmetic worth counting.
flop_formula = None


def onnx_translation():
    """The op in standard ONNX (onnxscript, trace-only; imported lazily): ``ScatterND`` for the flags,
    ``TopK(sorted=1)`` for the kept slots, a second ``TopK`` to put them in ascending order."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset18 as op

    float32 = 1  # onnx.TensorProto.FLOAT: TensorRT's TopK reads float keys (exact below 2**24)

    def sequence_keep_index(visual_positions, kept_positions, batch: int, seq_len: int, out_len: int):
        def filled(like, value: int):
            return op.ConstantOfShape(op.Shape(like), value=ir.tensor(np.array([value], dtype=np.int64)))

        flags = op.Constant(value=ir.tensor(np.ones(batch * seq_len, dtype=np.int64), name="sequence_flags"))
        flags = op.ScatterND(flags, op.Unsqueeze(visual_positions, [1]), filled(visual_positions, 0))
        flags = op.ScatterND(flags, op.Unsqueeze(kept_positions, [1]), filled(kept_positions, 1))
        flags = op.Reshape(flags, [batch, seq_len])
        key = op.Cast(op.Add(op.Mul(flags, op.Constant(value_int=seq_len)), op.Constant(value=ir.tensor(np.arange(seq_len, dtype=np.int64)))), to=float32)
        top, index = op.TopK(key, [out_len], axis=1, largest=1, sorted=1)
        ascending, order = op.TopK(top, [out_len], axis=1, largest=0, sorted=1)
        index = op.GatherElements(index, order, axis=1)
        kept = op.GreaterOrEqual(ascending, op.Constant(value_float=float(seq_len)))
        return op.Where(kept, index, op.Constant(value_int=-1))

    return sequence_keep_index
