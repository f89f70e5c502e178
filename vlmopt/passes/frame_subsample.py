"""Uniform frame sampling for streams: the baseline HERMES's "68% fewer tokens than uniform
sampling" is measured against (arXiv 2601.14724).

The stream encodes only a uniform ``keep_ratio`` of the video's frames, whole frames: temporal patch
``i`` (a frame pair on Qwen2.5-VL) is kept when ``⌊(i + 1)·r⌋ > ⌊i·r⌋``, so after ``T`` patches
``⌊T·r⌋`` are in the cache, evenly spread. Kept frames keep their time positions. The cache is
never compressed (no KV-tier ops: the chunk graph is unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from vlmopt.passes.base import check_range
from vlmopt.passes.kv_stream import KVStreamPass


@dataclass(frozen=True)
class FrameSubsample(KVStreamPass):
    """Keep a uniform ``keep_ratio`` of the frames (see the module docstring)."""

    kv_budget: int = 10**9
    """Unused bound (the cache is never compressed); kept so every stream pass reads the same way."""
    keep_ratio: float = 0.5
    """Fraction of the frames (whole temporal patches) the stream encodes, in (0, 1]."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("FrameSubsample", "keep_ratio", self.keep_ratio, 0, 1, low_open=True)

    def keeps_patch(self, index: int) -> bool:
        return math.floor((index + 1) * self.keep_ratio + 1e-9) > math.floor(index * self.keep_ratio + 1e-9)

    def apply(self, graph) -> None:
        """Nothing to rewrite: the stream drops frames before encoding them."""
