"""Export-friendly stand-ins for HF leaf modules that ``torch.export`` cannot trace as they are.

Some vision towers split the sequence with ``cu_seqlens.tolist()`` (data dependent) and run one
attention call per image or window (Qwen's). For a fixed image grid the segments are known at
export time, so a stand-in runs the same block as **one** SDPA call with a constant block-diagonal
mask built from segment ids (``seg[i] == seg[j]``), reusing the block's own submodules (same
weights, same order of operations up to the attention's summation order).

The adapter names its stand-ins (:meth:`~vlmopt.adapters.base.Adapter.export_leaves`);
:func:`make_exportable` swaps them into a vision GraphModule (on the GraphModule itself: the HF model
is never touched).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, fx, nn

StandInFactory = Callable[[nn.Module, fx.Node, dict[str, Any]], nn.Module]
"""(the HF leaf, its graph node, the planned inputs' constants) → the export stand-in."""


def segment_ids(cu_seqlens: Tensor) -> Tensor:
    """[S] int64 id of the attention segment of every row, from cumulative lengths [n + 1]."""
    bounds = [int(v) for v in cu_seqlens.tolist()]
    ids = [index for index, (lo, hi) in enumerate(pairwise(bounds)) for _ in range(hi - lo)]
    return torch.tensor(ids, dtype=torch.long)


def make_exportable(module: fx.GraphModule, constants: dict[str, Any], stand_ins: Mapping[str, StandInFactory]) -> list[str]:
    """Point every call of a module whose class name is in ``stand_ins`` at its stand-in; returns the
    swapped targets. ``constants`` are the values the graph's planned inputs are bound to for export."""
    swapped = []
    for node in module.graph.nodes:
        if node.op != "call_module":
            continue
        leaf = module.get_submodule(node.target)
        factory = stand_ins.get(type(leaf).__name__)
        if factory is None:
            continue
        name = "export_" + str(node.target).replace(".", "_")
        module.add_submodule(name, factory(leaf, node, constants))
        swapped.append(str(node.target))
        node.target = name
    module.recompile()
    return swapped
