"""Running vlmopt's pruning passes eagerly on the visual tokens a vLLM vision tower returned.

A vision-stage pass says which tokens to keep in :meth:`~vlmopt.passes.base.VisualTokenPrune.prune`,
which inserts its steps into a graph through an editor and an ``Inserter``. Here the same method runs
with an editor whose ``chain`` calls each step at once (:class:`EagerEditor`) and a site whose
tokens, layout and tower Q/K are tensors: the selection is the pass's own code and the ``vlmopt::``
ops it calls (``random_scores``, ``topk_indices``, ``pool_tokens``, ``received_attention``,
``hiprune_select``), not a second implementation. No vLLM import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlmopt.adapters.base import VisionQK
from vlmopt.graph.layout import VisualLayout
from vlmopt.integrations.vllm.spec import TowerFacts
from vlmopt.passes.base import VisualSite, VisualTokenPrune
from vlmopt.passes.hiprune import HiPrune


class _Chain:
    """An ``Inserter`` that runs each step now: ``chain(fn, *args, role=..., ...)`` is ``fn(*args)``."""

    def __call__(self, target, *args, role: str, stage: str | None = None, name: str | None = None, meta=None, **kwargs):
        return target(*args, **kwargs)


class _Order:
    """Graph order of values: every value is ready, so any of them can anchor a chain."""

    def __getitem__(self, value) -> int:
        return 0


class EagerEditor:
    """The part of a ``GraphEditor`` a vision-stage pass's ``prune`` uses, running steps eagerly."""

    def chain(self, after=None) -> _Chain:
        return _Chain()

    def order(self) -> _Order:
        return _Order()


@dataclass(frozen=True)
class TowerQK:
    """The queries and keys vLLM's vision attention computed in the blocks a pass reads."""

    q: Mapping[int, Tensor]
    """Block index → queries [P, heads, head_dim] of every tower token, in the tower's order."""
    k: Mapping[int, Tensor]
    """Block index → keys, like ``q``."""
    scale: float
    """Softmax scale of the vision attention."""
    order: Tensor | None
    """[T] index from the tower's token order to raster order (a windowed tower's reverse window index); None: the same."""


class TowerAdapter:
    """The facts of a vLLM tower plus its captured Q/K, answering what a pass asks an adapter."""

    def __init__(self, facts: TowerFacts, layout: VisualLayout, qk: TowerQK | None) -> None:
        self.facts, self.layout, self.qk = facts, layout, qk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.facts, name)

    def insert_vision_qk(self, editor, block: int, role: str = "attention_score") -> VisionQK:
        if self.qk is None or block not in self.qk.q:
            raise RuntimeError(f"vision block {block}'s queries and keys were not captured from the tower")
        q, k = self.qk.q[block], self.qk.k[block]
        return VisionQK(q, k, q.shape[-2], self.qk.scale, leading=0, merge=self.facts.merge, frames=self.layout, order=self.qk.order)


def blocks_read(pass_list: tuple[VisualTokenPrune, ...], facts: TowerFacts) -> tuple[int, ...]:
    """Vision blocks whose attention the passes read (HiPrune's object and deep layers), ascending."""
    blocks: set[int] = set()
    for item in pass_list:
        if isinstance(item, HiPrune):
            blocks.update(item.layers(facts))
    return tuple(sorted(blocks))


def prune(
    pass_list: tuple[VisualTokenPrune, ...], tokens: Tensor, grids: list[tuple[int, int, int]], facts: TowerFacts,
    qk: TowerQK | None = None,
) -> tuple[Tensor, Tensor, VisualLayout]:
    """(kept tokens [T', D], their indices into ``tokens`` [T'], the kept layout) after the passes.

    ``tokens`` [T, D] are the visual tokens of items with merged ``grids`` (t, h, w), each item's in
    raster order, items one after the other (a DeepStack token carries its DeepStack features in D, so
    they are kept, pooled or dropped with it). Each item keeps its own budget; indices ascend within it.
    """
    layout = VisualLayout.from_grids(len(grids), 0, tuple(range(len(grids))), tuple(grids))
    keep = torch.arange(tokens.shape[0], device=tokens.device)
    editor, chain = EagerEditor(), _Chain()
    for item in pass_list:
        adapter = TowerAdapter(facts, layout, qk)
        site = VisualSite(editor, adapter, tokens, keep, layout)
        tokens, kept, layout = item.prune(site, chain)
        keep = keep.index_select(0, kept)
    return tokens, keep, layout
