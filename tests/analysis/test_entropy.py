"""Truncated matrix entropy against numpy's SVD, its invariances, and a known spectrum."""

import math

import numpy as np
import pytest
import torch

from vlmopt.analysis.entropy import truncated_matrix_entropy


def svd_entropy(z: np.ndarray, k: int) -> float:
    """The same quantity from the singular values of the centred rows (σ² = Gram eigenvalues)."""
    centred = z.astype(np.float64) - z.astype(np.float64).mean(axis=0, keepdims=True)
    energies = np.sort(np.linalg.svd(centred, compute_uv=False) ** 2)[::-1][:k]
    p = energies / energies.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def low_rank_states(rows, width, rank, seed):
    """Rows spread over ``rank`` directions with decaying energy, plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, width, generator=generator)
    weights = torch.randn(rows, rank, generator=generator) * torch.linspace(3.0, 0.2, rank)
    return weights @ basis + 0.01 * torch.randn(rows, width, generator=generator) + 5.0


@pytest.mark.parametrize(
    "rows, width, k",
    [(200, 32, 50), (200, 32, 10), (20, 64, 50), (20, 64, 5), (33, 33, 7)],
    ids=["N>=D all", "N>=D truncated", "N<D all", "N<D truncated", "square"],
)
def test_matches_svd_spectrum(rows, width, k):
    z = low_rank_states(rows, width, rank=12, seed=rows + width + k)
    got = truncated_matrix_entropy(z, k=k)
    assert got == pytest.approx(svd_entropy(z.numpy(), k), rel=1e-9, abs=1e-12)
    assert 0.0 <= got <= math.log(min(k, rows, width)) + 1e-12


def test_invariant_to_row_order_scale_and_shift():
    z = low_rank_states(150, 24, rank=10, seed=1).double()  # exact scaling and shifting
    generator = torch.Generator().manual_seed(2)
    base = truncated_matrix_entropy(z, k=8)
    assert truncated_matrix_entropy(z[torch.randperm(150, generator=generator)], k=8) == pytest.approx(base, rel=1e-10)
    assert truncated_matrix_entropy(z * 37.5, k=8) == pytest.approx(base, rel=1e-10)
    assert truncated_matrix_entropy(z + torch.randn(1, 24, generator=generator, dtype=torch.float64) * 100, k=8) == pytest.approx(base, rel=1e-8)
    assert truncated_matrix_entropy(z.to(torch.bfloat16), k=8) == pytest.approx(base, rel=2e-2)  # any float dtype


def test_equal_energy_orthogonal_directions_give_log_k():
    generator = torch.Generator().manual_seed(3)
    directions, width = 7, 64
    basis, _ = torch.linalg.qr(torch.randn(width, directions, generator=generator, dtype=torch.float64))
    z = torch.cat([basis.T, -basis.T]) * 2.5  # ± each direction: zero mean, equal energy
    assert truncated_matrix_entropy(z, k=50) == pytest.approx(math.log(directions), rel=1e-10)
    assert truncated_matrix_entropy(z, k=3) == pytest.approx(math.log(3), rel=1e-10)
    assert truncated_matrix_entropy(z[:2], k=50) == pytest.approx(0.0, abs=1e-12)  # two rows: one direction


def test_collapse_lowers_the_entropy():
    spread = low_rank_states(300, 32, rank=20, seed=4)
    collapsed = spread + 40.0 * torch.randn(300, 1, generator=torch.Generator().manual_seed(5)) * torch.ones(1, 32)
    assert truncated_matrix_entropy(collapsed, k=20) < truncated_matrix_entropy(spread, k=20) - 0.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="no variance"):
        truncated_matrix_entropy(torch.ones(10, 4) * 3.0)
    with pytest.raises(ValueError, match="positive int"):
        truncated_matrix_entropy(torch.randn(10, 4), k=0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        truncated_matrix_entropy(torch.randn(2, 10, 4))
