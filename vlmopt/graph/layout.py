"""Static planning data about where the visual tokens of one prefill batch sit.

A :class:`VisualLayout` is computed by the architecture adapter in eager Python before the graph
runs and enters the prefill graph as an input. Graph nodes read plain ints from it (token counts,
grids, rows), so every ``vlmopt::`` op sees static sizes: this is what keeps pruning fixed-count
and exportable. Passes that change the number of visual tokens return a new layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class VisualLayout:
    """Visual inputs (images or videos) of one batch, in the order their tokens reach the LLM."""

    batch: int
    """Number of prompts (rows) in the batch."""
    seq_len: int
    """Length S of the (padded) prompt, in tokens, before any pruning."""
    rows: tuple[int, ...]
    """Row of the batch each visual input belongs to."""
    counts: tuple[int, ...]
    """Number of visual tokens of each input, as they flow at this point of the graph."""
    grids: tuple[Grid, ...] | None
    """(t, h, w) token grid of each input in raster order, or None once tokens no longer form grids."""
    leading: tuple[int, ...] | None = None
    """Tokens of each input before its grid (a CLS token), counted in ``counts``; None = none."""

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.counts):
            raise ValueError(f"VisualLayout: {len(self.rows)} rows for {len(self.counts)} inputs")
        leading = (0,) * len(self.counts) if self.leading is None else tuple(self.leading)
        if len(leading) != len(self.counts) or any(lead < 0 or lead > c for lead, c in zip(leading, self.counts)):
            raise ValueError(f"VisualLayout: leading tokens {leading} do not fit counts {self.counts}")
        object.__setattr__(self, "leading", leading)
        if self.grids is not None and tuple(lead + t * h * w for lead, (t, h, w) in zip(leading, self.grids)) != self.counts:
            raise ValueError(f"VisualLayout: grids {self.grids} (after {leading} leading tokens) do not match counts {self.counts}")

    @classmethod
    def from_grids(
        cls, batch: int, seq_len: int, rows: tuple[int, ...], grids: tuple[Grid, ...], leading: tuple[int, ...] | None = None
    ) -> VisualLayout:
        lead = leading or (0,) * len(grids)
        counts = tuple(a + t * h * w for a, (t, h, w) in zip(lead, grids))
        return cls(batch, seq_len, tuple(rows), counts, tuple(grids), leading)

    @property
    def total(self) -> int:
        """T, the number of visual tokens of the whole batch."""
        return sum(self.counts)

    @property
    def flat_grids(self) -> list[int]:
        if self.grids is None:
            raise ValueError("the visual tokens no longer form grids (an earlier pass pruned them)")
        return [d for grid in self.grids for d in grid]

    @property
    def grid_counts(self) -> tuple[int, ...]:
        """Tokens of each input after its leading tokens."""
        return tuple(c - lead for c, lead in zip(self.counts, self.leading))

    def with_counts(self, counts: tuple[int, ...]) -> VisualLayout:
        """The layout with ``counts`` tokens per input (leading tokens included); grids are gone."""
        return replace(self, counts=tuple(counts), grids=None)

    def with_grids(self, grids: tuple[Grid, ...]) -> VisualLayout:
        """The layout with new grids after the same leading tokens."""
        counts = tuple(lead + t * h * w for lead, (t, h, w) in zip(self.leading, grids))
        return replace(self, counts=counts, grids=tuple(grids))

    def grid_only(self) -> VisualLayout:
        """The layout of the grid tokens alone (leading tokens removed)."""
        return replace(self, counts=self.grid_counts, leading=None)

    def with_leading_of(self, other: VisualLayout) -> VisualLayout:
        """This grid-only layout with ``other``'s leading tokens put back in front of each input."""
        counts = tuple(c + lead for c, lead in zip(self.counts, other.leading))
        return replace(self, counts=counts, leading=other.leading)

    def tokens_per_row(self) -> list[int]:
        per_row = [0] * self.batch
        for row, count in zip(self.rows, self.counts):
            per_row[row] += count
        return per_row


def keep_count(count: int, keep_ratio: float | None, num_tokens: int | None) -> int:
    """Tokens kept of ``count`` for a keep ratio (rounded half up, at least 1) or an absolute budget."""
    if count == 0:
        return 0
    if num_tokens is not None:
        return min(num_tokens, count)
    return min(count, max(1, math.floor(keep_ratio * count + 0.5)))


def pooled_grid(grid: Grid, keep_ratio: float) -> Grid:
    """Output grid of spatial pooling that keeps about ``keep_ratio`` of a frame's tokens."""
    t, h, w = grid
    scale = math.sqrt(keep_ratio)
    return t, max(1, min(h, math.floor(h * scale + 0.5))), max(1, min(w, math.floor(w * scale + 0.5)))
