"""``vlmopt::regate_mask`` — ReGATE's active tokens: the top ``keep`` fraction of each sequence's
answer tokens by score (`ReGATE <https://arxiv.org/abs/2507.21420>`_).

Per sequence ``b`` with ``n_b`` answer tokens, the ``k_b = ⌈keep · n_b⌉`` answer tokens of highest
score are kept; ties go to the lower index. The count is per sequence, not per batch, so a long
answer cannot crowd a short one out of the loss and which tokens a sample keeps does not depend on
its batch-mates; the ceiling keeps at least the requested fraction, and at least one token of every
sequence that has an answer (``keep = 1`` keeps every answer token). ``keep · n_b`` is rounded to 9
decimals before the ceiling, so a product such as ``0.3 · 10 = 3.0000000000000004`` counts 3.

Shapes
------
scores  : [B, T] float (any finite values; only answer tokens' scores matter)
answer  : [B, T] bool
keep    : float in (0, 1]
returns : [B, T] bool, a subset of ``answer`` with ``k_b`` True entries in row ``b``
ONNX    : none (the op only lives in training graphs, and vlmopt exports inference graphs only)
"""

from __future__ import annotations

import torch
from torch import Tensor


def kept_counts(answer: Tensor, keep: float) -> Tensor:
    """[B] int64 ``⌈keep · n_b⌉`` (after rounding the product to 9 decimals)."""
    counts = answer.sum(dim=1).double()
    return torch.ceil(torch.round(counts * keep, decimals=9)).long()


def reference(scores: Tensor, answer: Tensor, keep: float) -> Tensor:
    # Rank by (answer first, then higher score, then lower index): two stable sorts, the
    # secondary key first, give exactly that order without sentinel scores that could tie.
    by_score = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    by_answer = torch.sort(answer.gather(1, by_score).to(torch.uint8), dim=1, descending=True, stable=True).indices
    order = by_score.gather(1, by_answer)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (ranks < kept_counts(answer, keep)[:, None]) & answer


@torch.library.custom_op("vlmopt::regate_mask", mutates_args=())
def regate_mask(scores: Tensor, answer: Tensor, keep: float) -> Tensor:
    if scores.shape != answer.shape or scores.dim() != 2 or answer.dtype != torch.bool:
        raise ValueError(
            f"regate_mask: scores {tuple(scores.shape)} and a bool answer mask {tuple(answer.shape)} "
            "must both be [batch, tokens]"
        )
    if not 0 < keep <= 1:
        raise ValueError(f"regate_mask: keep must be a fraction in (0, 1], got {keep}")
    return reference(scores, answer, keep)


@regate_mask.register_fake
def _(scores: Tensor, answer: Tensor, keep: float) -> Tensor:
    return answer.new_empty(answer.shape, dtype=torch.bool)


#: Index bookkeeping (a sort and a comparison), no arithmetic worth counting.
flop_formula = None

#: No ONNX form: the op only appears in training graphs, which vlmopt does not export.
onnx_translation = None
