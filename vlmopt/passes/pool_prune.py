"""PoolPrune — average-pool each frame's visual token grid (the "downsample" baseline)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from vlmopt.errors import PassConfigError
from vlmopt.graph import functions as gf
from vlmopt.graph.edit import Inserter
from vlmopt.passes.base import VisualSite, VisualTokenPrune


@dataclass(frozen=True)
class PoolPrune(VisualTokenPrune):
    """Average-pool every frame's (h, w) token grid to (h', w') ≈ (h, w)·√keep_ratio.

    The kept count per frame is ``h'·w'`` with ``h' = round(h·√r)`` (at least 1): close to, not always
    exactly, ``round(r·h·w)`` — e.g. 196 of 576 tokens at r = 1/3. Each pooled token takes the
    position id of the top-left token of its window. Structural tokens (a CLS token fed to the LLM,
    row newlines) are kept as they are, on top of the pooled grid. Each frame (an image, a tile, a
    temporal patch) is pooled within its own grid: a tiled image's base image and every tile apart (no
    window straddles two tiles), a grid OneVision resampled as one.
    """

    needs_grid: ClassVar[bool] = True
    needs: ClassVar[tuple[str, ...]] = ("grids",)

    def __post_init__(self) -> None:
        if self.num_tokens is not None:
            raise PassConfigError("PoolPrune takes keep_ratio (a fraction in (0, 1]), not num_tokens")
        super().__post_init__()

    def output_layout(self, layout):
        return gf.layout_pool(layout, self.keep_ratio)

    def prune(self, site: VisualSite, chain: Inserter) -> tuple[fx.Node, fx.Node, fx.Node]:
        layout = chain(
            gf.layout_pool, site.layout, self.keep_ratio, role="prune_layout", stage="vision", name="pooled_layout"
        )
        pooled = chain(gf.pool_tokens, site.tokens, site.layout, layout, role="prune_pool", stage="vision", name="pooled")
        tokens = chain(operator.getitem, pooled, 0, role="visual_tokens", stage="vision", name="pooled_tokens")
        anchors = chain(operator.getitem, pooled, 1, role="prune_select", stage="vision", name="pool_anchors")
        return tokens, anchors, layout
