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


def test_interleaved_structural_tokens_are_split_off_and_put_back_first():
    """Newlines after grid rows (structural tokens inside an input, not only in front of it): the grid is
    what is left, in raster order; a pruned or pooled input keeps every structural token, first, with its
    own value and slot, on top of the budget."""
    from vlmopt.graph.layout import VisualLayout

    # a 2×3 tile ending each row with a newline, then a 2×2 grid without newlines
    layout = VisualLayout.from_grids(1, 20, (0, 0), ((1, 2, 3), (1, 2, 2)), structural=((3, 7), ()))
    assert layout.counts == (8, 4) and layout.grid_counts == (6, 4) and layout.leading == (0, 0)
    tokens = torch.randn(12, 5)
    grid = gf.grid_index(tokens, layout)
    assert grid.tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10, 11]
    assert torch.equal(gf.grid_positions(torch.arange(100, 112), layout), torch.arange(100, 112)[grid])
    kept = gf.layout_keep(layout, 0.5, None)
    assert kept.counts == (2 + 3, 2) and kept.structural == ((0, 1), ()) and kept.grids is None
    grid_kept = gf.layout_keep(layout.grid_only(), 0.5, None)
    keep = torch.tensor([0, 2, 5, 6, 9])  # among the 10 grid tokens
    full = gf.keep_with_leading(keep, grid, layout, grid_kept)
    assert full.tolist() == [3, 7, 0, 2, 6, 8, 11]
    out = gf.tokens_with_leading(tokens, tokens[grid][keep], layout, grid_kept)
    assert torch.equal(out, tokens[full])
    pooled = gf.layout_pool(layout, 0.25)
    assert pooled.grids == ((1, 1, 2), (1, 1, 1)) and pooled.counts == (4, 1) and pooled.structural == ((0, 1), ())
