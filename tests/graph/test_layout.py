"""VisualLayout bookkeeping, keep counts and pooled grids."""

import pytest

from vlmopt.graph.layout import VisualLayout, keep_count, pooled_grid


def test_keep_count_rounds_half_up_and_keeps_one():
    assert keep_count(576, 1 / 3, None) == 192
    assert keep_count(576, 2 / 9, None) == 128
    assert keep_count(576, 1 / 9, None) == 64
    assert keep_count(5, 0.1, None) == 1
    assert keep_count(10, 0.25, None) == 3  # 2.5 rounds up
    assert keep_count(10, None, 40) == 10
    assert keep_count(0, 0.5, None) == 0


def test_pooled_grid():
    assert pooled_grid((1, 24, 24), 1 / 3) == (1, 14, 14)
    assert pooled_grid((2, 4, 6), 0.25) == (2, 2, 3)
    assert pooled_grid((1, 1, 1), 0.01) == (1, 1, 1)


def test_layout_validation_and_rows():
    layout = VisualLayout.from_grids(2, 30, (0, 1, 1), ((1, 2, 2), (1, 3, 3), (2, 1, 2)))
    assert layout.counts == (4, 9, 4) and layout.total == 17
    assert layout.tokens_per_row() == [4, 13]
    assert layout.with_counts((2, 3, 1)).grids is None
    with pytest.raises(ValueError, match="do not match counts"):
        VisualLayout(1, 10, (0,), (5,), ((1, 2, 2),))
    with pytest.raises(ValueError, match="no longer form grids"):
        layout.with_counts((1, 1, 1)).flat_grids


def test_structural_tokens_interleaved_with_a_grid():
    """A newline after each row of a 2×3 grid: structural indices 3 and 7 of 8 tokens."""
    layout = VisualLayout.from_grids(1, 20, (0,), ((1, 2, 3),), structural=((3, 7),))
    assert layout.counts == (8,) and layout.grid_counts == (6,) and layout.has_structural
    assert layout.grid_indices(0) == [0, 1, 2, 4, 5, 6] and layout.leading == (0,)
    pruned = layout.with_counts((5,))  # after a pass: the 2 structural tokens first, then 3 kept grid tokens
    assert pruned.structural == ((0, 1),) and pruned.leading == (2,) and pruned.grid_counts == (3,)
    with pytest.raises(ValueError, match="structural tokens"):
        VisualLayout(1, 20, (0,), (8,), None, structural=((3, 9),))
    with pytest.raises(ValueError, match="do not match counts"):
        VisualLayout(1, 20, (0,), (8,), ((1, 2, 3),), structural=((3,),))  # 1 + 6 tokens, not 8


def test_structural_tokens_survive_any_selection_and_keep_their_slots():
    """gf.grid_index / keep_with_leading / tokens_with_leading on interleaved structural tokens: for a
    random choice of grid tokens, each input's structural tokens come first, then its kept grid tokens."""
    import torch

    from vlmopt.graph import functions as gf

    generator = torch.Generator().manual_seed(5)
    layout = VisualLayout.from_grids(2, 40, (0, 1), ((1, 2, 3), (1, 3, 2)), structural=((3, 7), (2, 5, 8)))
    tokens = torch.randn(layout.total, 4, generator=generator)
    grid = gf.grid_index(tokens, layout)
    assert grid.tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 11, 12, 14, 15]
    kept = gf.layout_keep(layout.grid_only(), 0.5, None)
    keep = torch.cat([torch.randperm(6, generator=generator)[:3].sort().values, 6 + torch.randperm(6, generator=generator)[:3].sort().values])
    full_kept = gf.layout_with_leading(kept, layout)
    index = gf.keep_with_leading(keep, grid, layout, kept)
    assert index[:2].tolist() == [3, 7] and index[5:8].tolist() == [8 + 2, 8 + 5, 8 + 8]
    assert index[2:5].tolist() == grid[keep[:3]].tolist() and index[8:].tolist() == grid[keep[3:]].tolist()
    assert torch.equal(gf.tokens_with_leading(tokens, tokens[grid[keep]], layout, kept), tokens[index])
    assert full_kept.counts == (5, 6) and full_kept.structural == ((0, 1), (0, 1, 2))
