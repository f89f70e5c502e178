"""RandomPrune — keep a seeded random subset of each image's visual tokens (a control baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from vlmopt.errors import PassConfigError
from vlmopt.graph import functions as gf
from vlmopt.graph.edit import Inserter
from vlmopt.passes.base import VisualSite, VisualTokenPrune


@dataclass(frozen=True)
class RandomPrune(VisualTokenPrune):
    """Keep a seeded random subset of ``keep_ratio`` of every visual input's tokens.

    The subset depends only on the seed and the input's token count, so results do not depend on
    batching. Every serious pruning method should beat this control at every budget. A tiled image's
    base image and each of its tiles draw their own subset, ``keep_ratio`` of each; newlines stay.
    """

    seed: int = 0
    """Seed of the random scores."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise PassConfigError(f"RandomPrune.seed must be a whole number ≥ 0, got {self.seed!r}")

    def score(self, site: VisualSite, chain: Inserter) -> fx.Node:
        return chain(gf.random_scores, site.tokens, site.layout, self.seed, role="prune_score", stage="vision", name="scores")
