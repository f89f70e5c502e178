"""Layout-reading LLM nodes bound to the export's one-image-per-row layout.

A pass's nodes inside the language model may read the prompt's
:class:`~vlmopt.graph.layout.VisualLayout` for static per-row counts and loop over the rows in
Python (HalfV's cut and its layer inactivity), so ``torch.export`` would fix the batch size. An
export fixes the image size, and these graphs one image per row, so every row holds the same number
of visual tokens: each pass declares, in :meth:`~vlmopt.passes.base.Pass.export_bindings`, how each
such function is swapped for a batched function of the same result that takes those counts as ints,
and :func:`bind_visual_rows` applies them.

The exporter checks the bound graph against the pipeline graph on its example prompt
(:func:`vlmopt.export.graphs.build_graphs`), and the runtime refuses a prompt whose rows do not hold
one image each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import fx

from vlmopt.export.errors import ExportError

Binding = Callable[[fx.Node, int], tuple[Callable, tuple]]
"""(node, visual tokens per row) → (batched function, its arguments)."""


def bind_visual_rows(module: fx.GraphModule, per_row: int, bindings: Mapping[Callable, Binding]) -> list[str]:
    """Swap every node of ``module`` (an LLM graph) calling a function in ``bindings`` for its batched
    form with ``per_row`` visual tokens in every row, and drop the ``layout`` input; returns their names."""
    bound = []
    for node in list(module.graph.nodes):
        binder = bindings.get(node.target) if node.op == "call_function" else None
        if binder is None:
            continue
        if per_row < 1:
            raise ExportError(f"{node.name} cuts the visual tokens, but the export's image reaches the LLM with {per_row} tokens")
        node.target, node.args = binder(node, per_row)
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
