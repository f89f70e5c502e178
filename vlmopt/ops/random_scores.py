"""``vlmopt::random_scores`` — seeded uniform scores, the RandomPrune control.

Each visual input gets ``torch.rand(count)`` from a generator seeded with ``seed``: the scores
depend only on the seed and the input's token count, never on what else is in the batch, so a
batch gives the same kept tokens as its rows run one by one.

Shapes
------
like    : any tensor on the target device (only its device is used)
counts  : int[N]
returns : [sum(counts)] float32
ONNX    : a constant (the scores depend on static shapes and the seed only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def reference(like: Tensor, counts: list[int], seed: int) -> Tensor:
    parts = []
    for count in counts:
        generator = torch.Generator().manual_seed(seed)
        parts.append(torch.rand(count, generator=generator))
    scores = torch.cat(parts) if parts else torch.empty(0)
    return scores.to(like.device)


@torch.library.custom_op("vlmopt::random_scores", mutates_args=())
def random_scores(like: Tensor, counts: list[int], seed: int) -> Tensor:
    return reference(like, counts, seed)


@random_scores.register_fake
def _(like: Tensor, counts: list[int], seed: int) -> Tensor:
    return like.new_empty((sum(counts),), dtype=torch.float32)


#: Random numbers, no arithmetic worth counting.
flop_formula = None


def onnx_translation():
    """The op in standard ONNX (onnxscript, trace-only; imported lazily): a constant.

    The scores depend only on the seed and the static counts, so they are computed here, once.
    """
    import onnx_ir as ir
    from onnxscript import opset18 as op

    def random_scores(like, counts: Sequence[int], seed: int):
        values = reference(torch.empty(0), list(counts), seed).numpy()
        return op.Constant(value=ir.tensor(values, name="random_scores"))

    return random_scores
