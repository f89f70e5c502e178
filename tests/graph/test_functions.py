"""Graph functions checked against plain Python on fresh random inputs."""

import pytest
import torch

from vlmopt.graph import functions as gf


@pytest.mark.parametrize("seed", range(5))
def test_right_aligned_lists_each_rows_true_slots_ascending_padded_on_the_left(seed):
    g = torch.Generator().manual_seed(seed)
    rows, seq = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
    flags = torch.rand(rows, seq, generator=g) > 0.5
    out_len = int(flags.sum(1).max()) + int(torch.randint(0, 3, (1,), generator=g))
    expected = []
    for row in flags.tolist():
        slots = [s for s, flag in enumerate(row) if flag]
        expected.append([-1] * (out_len - len(slots)) + slots)
    assert gf.right_aligned(flags, out_len).tolist() == expected
