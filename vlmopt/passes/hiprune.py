"""HiPrune — visual tokens chosen by the vision encoder's own hierarchical attention.

Paper: "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision Encoders",
https://arxiv.org/abs/2508.00553 (official code: github.com/Danielement321/HiPrune).

Each visual input keeps N' tokens: anchors (most attended at a middle, object-centric layer),
their grid neighbours as buffers, and registers (most attended at the deep layer) filling the
budget. Scores come from each layer's own Q/K (``vlmopt::received_attention``), so the model keeps
running SDPA; selection is ``vlmopt::hiprune_select``. Training-free, query-agnostic, prefill only.

Default layers: the object layer the paper gives for the family (the adapter's ``paper_settings``:
CLIP ViT-L's 9th of 24, Qwen2.5-VL's 16th of 32), scaled to the model's tower by the same fraction
(index ``round(layer / depth · D) − 1``), or the middle block of a tower the paper did not cover; the
deep layer is the deepest block feeding the LLM. Scores are dense per image or frame (windows
ignored, inputs never mixed) and averaged over the tower tokens a merger joins into one visual token.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, fx

from vlmopt.errors import IncompatiblePassError
from vlmopt.graph import functions as gf
from vlmopt.graph.edit import Inserter
from vlmopt.graph.layout import VisualLayout
from vlmopt.passes.base import VisualSite, VisualTokenPrune, check_range

ops = torch.ops.vlmopt

#: (object layer, out of a tower this deep) where the paper gives none for the family: the middle block.
DEFAULT_OBJECT_LAYER = (1, 2)


def vision_received_attention(
    q: Tensor, k: Tensor, layout: VisualLayout, num_heads: int, scale: float, leading: int, merge: int,
    score=ops.received_attention,
) -> Tensor:
    """[T_grid] attention each grid visual token receives in one vision block, in the tower's order.

    ``q``, ``k`` hold the block's queries and keys of every frame (see
    :class:`vlmopt.adapters.base.VisionQK`): attention is dense per image or frame (windows
    ignored, inputs never mixed), every query votes, the ``leading`` columns (CLS) are dropped,
    and the scores of the ``merge`` tower tokens of one visual token are averaged. Frames of one size
    go through ``score`` (the op; training passes its differentiable reference) together.
    """
    sizes = [(t, leading + h * w * merge) for t, h, w in layout.grids]
    total = sum(t * size for t, size in sizes)
    q, k = q.reshape(total, -1), k.reshape(total, -1)
    scores, offset, first = [], 0, 0
    while first < len(sizes):
        size, last = sizes[first][1], first
        while last < len(sizes) and sizes[last][1] == size:
            last += 1
        frames = sum(t for t, _ in sizes[first:last])
        block = slice(offset, offset + frames * size)
        received = score(q[block].reshape(frames, size, -1), k[block].reshape(frames, size, -1), num_heads, scale)
        scores.append(received[:, leading:].reshape(-1))
        offset, first = offset + frames * size, last
    flat = torch.cat(scores)
    return flat if merge == 1 else flat.reshape(-1, merge).mean(-1)


def hiprune_select(
    object_scores: Tensor, deep_scores: Tensor, layout: VisualLayout, kept: VisualLayout, alpha: float
) -> tuple[Tensor, Tensor]:
    """(kept indices [T'], kinds [T']) — HiPrune's selection with ``round(alpha · N' / 5)`` anchors."""
    anchors = [min(budget, int(alpha * budget / 5 + 0.5)) for budget in kept.counts]
    return ops.hiprune_select(object_scores, deep_scores, layout.flat_grids, list(kept.counts), anchors)


@dataclass(frozen=True)
class HiPrune(VisualTokenPrune):
    """Keep anchors, buffers and registers chosen by the vision tower's attention.

    Position policy: kept tokens keep their original position ids; see :class:`VisualTokenPrune`.
    Structural tokens (a CLS token fed to the LLM, newline tokens) are always kept, on top of the
    budget; the grid tokens' scores leave the CLS column out (it is never a grid neighbour). Each
    image or video frame is scored and selected on its own grid (a tiled image's tiles and base
    image are the adapter's frames).

    Tiled images (LLaVA-NeXT / OneVision), as the official code's LLaVA-NeXT path: a budget per crop
    (the base image and every tile keep ``keep_ratio`` of their own tokens) with anchors, buffers and
    registers chosen on each crop's grid from the tower's attention inside that crop. The official
    code forces spatial merging without unpadding, so its crops are equal (``N'/B`` each); here a tile
    the unpadding cropped keeps proportionally fewer, and the newline after each row stays outside the
    budget. A grid OneVision resamples (and a pooled video frame) takes each token's score from the
    tower token under its centre.
    """

    needs_grid: ClassVar[bool] = True
    needs: ClassVar[tuple[str, ...]] = ("vision_qk", "grids")
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
        layer, depth = self.paper_setting(adapter, "object_layer", DEFAULT_OBJECT_LAYER)
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
            vision_received_attention, qk.q, qk.k, qk.frames, qk.heads, qk.scale, qk.leading, qk.merge,
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
            hiprune_select, object_scores, deep_scores, site.layout, layout, self.alpha,
            role="prune_select", stage="vision", name="hiprune_select",
        )
        keep = chain(operator.getitem, selected, 0, role="prune_select", stage="vision", name="keep")
        chain(operator.getitem, selected, 1, role="prune_kinds", stage="vision", name="token_kinds")
        tokens = chain(torch.index_select, site.tokens, 0, keep, role="visual_tokens", stage="vision", name="kept_tokens")
        return tokens, keep, layout
