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
