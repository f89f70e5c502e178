"""Layout-reading LLM nodes bound to the export's one-image-per-row layout.

A pass's nodes inside the language model may read the prompt's
:class:`~vlmopt.graph.layout.VisualLayout` for static per-row counts and loop over the rows in
Python (HalfV's cut and its layer inactivity), so ``torch.export`` would fix the batch size. An
export fixes the image size, and these graphs one image per row, so every row holds the same visual
inputs (an image's tiles and their structural tokens included): each pass declares, in
:meth:`~vlmopt.passes.base.Pass.export_bindings`, how each such function is swapped for a batched
function of the same result that takes the counts of that one-row layout as ints, and
:func:`bind_visual_rows` applies them.

The exporter checks the bound graph against the pipeline graph on its example prompt
(:func:`vlmopt.export.graphs.build_graphs`), and the runtime refuses a prompt whose rows do not hold
one image each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, fx

from vlmopt.export.errors import ExportError
from vlmopt.graph import functions as gf
from vlmopt.graph.layout import VisualLayout

Binding = Callable[[fx.Node, VisualLayout], tuple[Callable, tuple]]
"""(node, the layout of one row's visual inputs) → (batched function, its arguments)."""


def bind_visual_rows(module: fx.GraphModule, row: VisualLayout, bindings: Mapping[Callable, Binding]) -> list[str]:
    """Swap every node of ``module`` (an LLM graph) calling a function in ``bindings`` for its batched
    form with the visual inputs of ``row`` (one row's layout as it reaches the LLM) in every row, and
    drop the ``layout`` input; returns their names."""
    bound = []
    for node in list(module.graph.nodes):
        binder = bindings.get(node.target) if node.op == "call_function" else None
        if binder is None:
            continue
        if row.batch != 1 or sum(row.grid_counts) < 1:
            raise ExportError(f"{node.name} cuts the visual tokens, but the export's image reaches the LLM with "
                              f"{sum(row.grid_counts)} grid tokens in {row.batch} row(s)")
        node.target, node.args = binder(node, row)
        bound.append(node.name)
    for node in list(module.graph.nodes):
        if node.op == "placeholder" and node.target == "layout":
            if node.users:
                raise ExportError(
                    f"LLM nodes {[u.name for u in node.users]} still read the VisualLayout after binding; the pass "
                    "that inserted them declares no export binding for them (Pass.export_bindings)"
                )
            module.graph.erase_node(node)
    module.recompile()
    return bound


def grid_positions_rows(positions: Tensor, grid: list[int], per_image: int) -> Tensor:
    """:func:`~vlmopt.graph.functions.grid_positions` for images that each bring ``per_image`` tokens,
    one after the other, in ``positions`` [B·per_image]: their grid tokens sit at ``grid`` among them."""
    index = torch.tensor(grid, dtype=torch.long, device=positions.device)
    return positions.view(-1, per_image).index_select(1, index).reshape(-1)


def bind_grid_positions(node: fx.Node, row: VisualLayout) -> tuple[Callable, tuple]:
    """The :func:`grid_positions_rows` call equal to a :func:`~vlmopt.graph.functions.grid_positions` node
    (the visual span without structural tokens, which an in-LLM cut builds) for rows holding ``row``'s inputs."""
    positions, _ = node.args
    grid, offset = [], 0
    for index, count in enumerate(row.counts):
        grid += [offset + i for i in row.grid_indices(index)]
        offset += count
    return grid_positions_rows, (positions, grid, row.total)


#: Layout-reading functions the core inserts into the LLM (every export binds them, whatever the passes).
CORE_BINDINGS: dict[Callable, Binding] = {gf.grid_positions: bind_grid_positions}
