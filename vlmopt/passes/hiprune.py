"""HiPrune — visual tokens chosen by the vision encoder's own hierarchical attention.

Paper: "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision Encoders",
https://arxiv.org/abs/2508.00553 (official code: github.com/Danielement321/HiPrune).

Each visual input keeps N' tokens: anchors (most attended at a middle, object-centric layer),
their grid neighbours as buffers, and registers (most attended at the deep layer) filling the
budget. Scores come from each layer's own Q/K (``vlmopt::received_attention``), so the model keeps
running SDPA; selection is ``vlmopt::hiprune_select``. Training-free, query-agnostic, prefill only.

Default layers, from the paper, scaled to other depths by the same fraction of the tower:

* LLaVA: object layer = the 9th of 24 (index 8), i.e. index ``round(0.375·L) − 1``; deep layer =
  the layer producing the LLM's features (``vision_feature_layer``; index 22 for LLaVA-1.5).
* Qwen2.5-VL: object block = the 16th of 32 (index 15), i.e. ``round(0.5·D) − 1``; deep = the last
  block. Scores are dense per image or frame (windows ignored, inputs never mixed) and averaged
  over each 2×2 merge group.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from vlmopt.errors import IncompatiblePassError
from vlmopt.graph import functions as gf
from vlmopt.graph.edit import Inserter
from vlmopt.passes.base import VisualSite, VisualTokenPrune, check_range

#: (object layer, out of a tower this deep) from the paper, per family.
PAPER_OBJECT_LAYER = {"llava": (9, 24), "qwen2_5_vl": (16, 32)}


@dataclass(frozen=True)
class HiPrune(VisualTokenPrune):
    """Keep anchors, buffers and registers chosen by the vision tower's attention.

    Position policy: kept tokens keep their original position ids; see :class:`VisualTokenPrune`.
    A CLS token fed to the LLM (LLaVA, strategy ``full``) is always kept, on top of the budget; the
    grid tokens' scores leave the CLS column out (it is never a grid neighbour).
    """

    needs_grid: ClassVar[bool] = True
    paper: ClassVar[str] = "https://arxiv.org/abs/2508.00553"

    alpha: float = 0.1
    """Share of the budget spent on anchors and their buffers: ``round(alpha·N'/5)`` anchors, in (0, 1]."""
    object_layer: int | None = None
    """0-based vision block whose attention picks anchors; None = the paper's, scaled to the depth."""
    deep_layer: int | None = None
    """0-based vision block whose attention picks registers; None = the deepest block feeding the LLM."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("HiPrune", "alpha", self.alpha, 0, 1, low_open=True)
        for name in ("object_layer", "deep_layer"):
            value = getattr(self, name)
            if value is not None:
                check_range("HiPrune", name, value, 0, 10**4, integer=True)

    def layers(self, adapter) -> tuple[int, int]:
        """(object layer, deep layer) for this model."""
        layer, depth = PAPER_OBJECT_LAYER[adapter.family]
        default_object = max(0, round(layer / depth * adapter.vision_depth) - 1)
        object_layer = default_object if self.object_layer is None else self.object_layer
        deep_layer = adapter.feature_block if self.deep_layer is None else self.deep_layer
        return object_layer, deep_layer

    def check(self, adapter, before) -> None:
        super().check(adapter, before)
        object_layer, deep_layer = self.layers(adapter)
        for name, value in (("object_layer", object_layer), ("deep_layer", deep_layer)):
            if value > adapter.feature_block:
                raise IncompatiblePassError(
                    f"HiPrune.{name}={value}, but only vision blocks 0..{adapter.feature_block} feed this model's LLM"
                )

    def received_attention(self, site: VisualSite, block: int) -> fx.Node:
        """[T] attention each (grid) visual token receives in vision block ``block`` (§3.1): the
        column means of the block's attention, from its own queries and keys."""
        qk = site.adapter.insert_vision_qk(site.editor, block, role="prune_score")
        chain = site.editor.chain(max((qk.q, qk.k), key=site.editor.order().__getitem__))
        scores = chain(
            gf.vision_received_attention, qk.q, qk.k, qk.frames, qk.heads, qk.scale, qk.leading, qk.merge,
            role="prune_score", stage="vision", name=f"vision_{block}_received",
        )
        if qk.order is None:
            return scores
        return chain(torch.index_select, scores, 0, qk.order, role="prune_score", stage="vision", name=f"vision_{block}_scores")

    def prune(self, site: VisualSite, chain: Inserter) -> tuple[fx.Node, fx.Node, fx.Node]:
        object_layer, deep_layer = self.layers(site.adapter)
        object_scores = self.received_attention(site, object_layer)
        deep_scores = object_scores if deep_layer == object_layer else self.received_attention(site, deep_layer)
        layout = chain(
            gf.layout_keep, site.layout, self.keep_ratio, self.num_tokens, role="prune_layout", stage="vision",
            name="kept_layout",
        )
        selected = chain(
            gf.hiprune_select, object_scores, deep_scores, site.layout, layout, self.alpha,
            role="prune_select", stage="vision", name="hiprune_select",
        )
        keep = chain(operator.getitem, selected, 0, role="prune_select", stage="vision", name="keep")
        chain(operator.getitem, selected, 1, role="prune_kinds", stage="vision", name="token_kinds")
        tokens = chain(torch.index_select, site.tokens, 0, keep, role="visual_tokens", stage="vision", name="kept_tokens")
        return tokens, keep, layout
