"""Static planning data about where the visual tokens of one prefill batch sit.

A :class:`VisualLayout` is computed by the architecture adapter in eager Python before the graph
runs and enters the prefill graph as an input. Graph nodes read plain ints from it (token counts,
grids, rows), so every ``vlmopt::`` op sees static sizes: this is what keeps pruning fixed-count
and exportable. Passes that change the number of visual tokens return a new layout.

**Structural tokens.** Some visual features are not grid cells: a CLS token fed to the LLM (LLaVA
with the ``full`` strategy), a learned newline after each row of a high-resolution grid (LLaVA-NeXT
/ OneVision). The layout records, per visual input, the indices of these tokens among its features
(:attr:`VisualLayout.structural`); the grid is the rest, in raster order. A pruning pass keeps them
outside its budget and never scores them. Once a pass has pruned an input its tokens flow as its
structural tokens first (in their original order), then its kept grid tokens: every token still
carries its own sequence slot, so the LLM sees them in their original order whatever the flat order.
Structural *text* tokens (Mistral 3's ``[IMG_BREAK]``, SmolVLM's row/column tokens, Qwen3-VL's
timestamps) are not visual features: they are text, which no pass removes.
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
    """Structural tokens in front of each input's grid (a CLS token); counted in ``counts``; None = none.
    Shorthand for ``structural`` = ``(0, …, leading - 1)``."""
    structural: tuple[tuple[int, ...], ...] | None = None
    """Ascending indices, among each input's ``counts[i]`` tokens, of its structural tokens (never
    scored, always kept); None = the ``leading`` ones."""

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.counts):
            raise ValueError(f"VisualLayout: {len(self.rows)} rows for {len(self.counts)} inputs")
        if self.structural is None:
            leading = (0,) * len(self.counts) if self.leading is None else tuple(self.leading)
            if len(leading) != len(self.counts):
                raise ValueError(f"VisualLayout: leading tokens {leading} do not fit counts {self.counts}")
            structural = tuple(tuple(range(lead)) for lead in leading)
        else:
            structural = tuple(tuple(s) for s in self.structural)
        if len(structural) != len(self.counts) or any(
            list(s) != sorted(set(s)) or (s and (s[0] < 0 or s[-1] >= c)) for s, c in zip(structural, self.counts)
        ):
            raise ValueError(f"VisualLayout: structural tokens {structural} do not fit counts {self.counts}")
        object.__setattr__(self, "structural", structural)
        object.__setattr__(self, "leading", tuple(_leading_run(s) for s in structural))
        if self.grids is not None and tuple(len(s) + t * h * w for s, (t, h, w) in zip(structural, self.grids)) != self.counts:
            raise ValueError(f"VisualLayout: grids {self.grids} (beside structural tokens {structural}) do not match counts {self.counts}")

    @classmethod
    def from_grids(
        cls, batch: int, seq_len: int, rows: tuple[int, ...], grids: tuple[Grid, ...], leading: tuple[int, ...] | None = None,
        structural: tuple[tuple[int, ...], ...] | None = None,
    ) -> VisualLayout:
        """The layout of inputs with ``grids``, after ``leading`` structural tokens each or with
        ``structural`` token indices (interleaved with the grid)."""
        if structural is None:
            structural = tuple(tuple(range(a)) for a in (leading or (0,) * len(grids)))
        counts = tuple(len(s) + t * h * w for s, (t, h, w) in zip(structural, grids))
        return cls(batch, seq_len, tuple(rows), counts, tuple(grids), structural=structural)

    @property
    def total(self) -> int:
        """T, the number of visual tokens of the whole batch."""
        return sum(self.counts)

    @property
    def has_structural(self) -> bool:
        """Does any input carry structural tokens?"""
        return any(self.structural)

    @property
    def flat_grids(self) -> list[int]:
        if self.grids is None:
            raise ValueError("the visual tokens no longer form grids (an earlier pass pruned them)")
        return [d for grid in self.grids for d in grid]

    @property
    def grid_counts(self) -> tuple[int, ...]:
        """Tokens of each input that are not structural."""
        return tuple(c - len(s) for c, s in zip(self.counts, self.structural))

    def grid_indices(self, index: int) -> list[int]:
        """Indices, among input ``index``'s tokens, of its grid (non-structural) tokens, ascending."""
        structural = set(self.structural[index])
        return [i for i in range(self.counts[index]) if i not in structural]

    def with_counts(self, counts: tuple[int, ...]) -> VisualLayout:
        """The layout after pruning: ``counts`` tokens per input, its structural tokens first (as many
        as before), then its kept grid tokens; grids are gone."""
        structural = tuple(tuple(range(len(s))) for s in self.structural)
        return replace(self, counts=tuple(counts), grids=None, leading=None, structural=structural)

    def with_grids(self, grids: tuple[Grid, ...]) -> VisualLayout:
        """The layout with new grids (pooling) after the same structural tokens, now in front."""
        structural = tuple(tuple(range(len(s))) for s in self.structural)
        counts = tuple(len(s) + t * h * w for s, (t, h, w) in zip(structural, grids))
        return replace(self, counts=counts, grids=tuple(grids), leading=None, structural=structural)

    def grid_only(self) -> VisualLayout:
        """The layout of the grid tokens alone (structural tokens removed)."""
        return replace(self, counts=self.grid_counts, leading=None, structural=((),) * len(self.counts))

    def with_leading_of(self, other: VisualLayout) -> VisualLayout:
        """This grid-only layout with ``other``'s structural tokens put back in front of each input."""
        structural = tuple(tuple(range(len(s))) for s in other.structural)
        counts = tuple(c + len(s) for c, s in zip(self.counts, structural))
        return replace(self, counts=counts, leading=None, structural=structural)

    def tokens_per_row(self) -> list[int]:
        per_row = [0] * self.batch
        for row, count in zip(self.rows, self.counts):
            per_row[row] += count
        return per_row


def _leading_run(structural: tuple[int, ...]) -> int:
    """How many of the first indices are 0, 1, 2, … (the structural tokens in front of the grid)."""
    run = 0
    while run < len(structural) and structural[run] == run:
        run += 1
    return run


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
