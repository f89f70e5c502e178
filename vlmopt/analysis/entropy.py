"""Truncated matrix entropy (TME) of a set of hidden states.

HalfV (arXiv 2604.16462, https://arxiv.org/abs/2604.16462) tracks, layer by layer, how spread out the
visual tokens' hidden states are: the Shannon entropy of the top of their covariance spectrum. High
entropy = many directions carry energy (stage I, modality alignment); falling entropy = the tokens
collapse onto a few directions (stage II, global aggregation); rising again = stage III, saturation.

For ``Z`` = the rows of ``z`` minus their mean, ``G = ZᵀZ`` if ``N ≥ D`` else ``ZZᵀ`` (the two share
their nonzero eigenvalues; the smaller one is cheaper), ``λ_1 ≥ λ_2 ≥ …`` its eigenvalues, and
``p_i = λ_i / Σ_{j≤k} λ_j`` over the top ``k``:

    H(z) = −Σ_{i≤k, p_i>0} p_i log p_i       (nats; 0 ≤ H ≤ log k)

Computed in float64. The official code (``metric_utils.compute_truncated_entropy``) also clamps the
Gram matrix's *entries* at 0 before the eigendecomposition, which changes the spectrum whenever two
centred directions are anti-correlated; that is not done here (negative eigenvalues from rounding
are clamped to 0 instead).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def truncated_matrix_entropy(z: Tensor, k: int = 50) -> float:
    """Entropy (nats) of the top-``k`` eigenvalue distribution of the centred Gram matrix of ``z``.

    ``z``: [N, D] hidden states of one token subset (e.g. the visual tokens of one or several
    samples, stacked). ``k`` ≥ 1; fewer than ``k`` eigenvalues (``min(N, D)``) use them all.
    Invariant to row order and to scaling ``z``; raises ``ValueError`` when the centred rows are all
    zero (fewer than two distinct rows), where the entropy is undefined.
    """
    if z.dim() != 2:
        raise ValueError(f"truncated_matrix_entropy: z must be [N, D], got shape {tuple(z.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"truncated_matrix_entropy: k must be a positive int, got {k!r}")
    centred = z.detach().to(device="cpu", dtype=torch.float64)
    centred = centred - centred.mean(dim=0, keepdim=True)
    rows, width = centred.shape
    gram = centred.T @ centred if rows >= width else centred @ centred.T
    eigenvalues = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0.0)[:k]
    total = eigenvalues.sum().item()
    if not total > 0.0 or not math.isfinite(total):
        raise ValueError(
            f"truncated_matrix_entropy: the centred states have no variance (N={rows}; total energy {total}); "
            "pass at least two distinct rows"
        )
    p = eigenvalues / total
    p = p[p > 0]
    return float(-(p * p.log()).sum().item())
