"""Cut a rewritten prefill GraphModule into a vision graph and an LLM graph, by node ``stage``.

The prefill graph of every adapter reads ``merge = vlmopt::merge_visual(embeds, tokens, slots)``:
the vision part (nodes whose ``meta["stage"]`` is ``vision`` or ``projector``) ends in ``tokens``
[T', D] (the visual tokens that reach the LLM, pruning included) and, after a pruning pass, in
``slots`` [T'] (where they go). The cut is made exactly there:

* **vision graph**: the vision nodes, reading ``pixel_values`` and planned vision inputs; outputs
  ``visual_embeds`` [T', D] and, after pruning, ``visual_index`` [T'] — the merge's slots computed
  with ``visual_positions = arange(T)``, i.e. the index of each kept token among the image's tokens.
* **LLM graph**: everything else, reading ``visual_embeds`` and ``visual_slots`` (flat ``b·S + s``
  slots of those tokens in the prompt) instead of the vision values.

LLM nodes that read a :class:`~vlmopt.graph.layout.VisualLayout` cannot have dynamic shapes. The
ones listed in :data:`PLANNED_FUNCTIONS` are index bookkeeping computed from slots alone; they
leave the graph and become inputs of the same name, which the runtime plans in numpy
(:mod:`vlmopt.export.planning`). The ones a pass declares export bindings for
(:meth:`~vlmopt.passes.base.Pass.export_bindings`: HalfV's in-LLM cut) stay, reading a ``layout``
input of the LLM graph until :func:`~vlmopt.export.fixed_rows.bind_visual_rows` binds them to the
export's one-image-per-row layout (:attr:`PrefillSplit.row_bound`). Any other such node is refused
with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from torch import fx

from vlmopt.export.errors import ExportError
from vlmopt.graph import functions as gf
from vlmopt.graph.capture import args_of

VISION_STAGES = ("vision", "projector")

#: LLM-side functions of planning data that the runtime computes in numpy instead: {function: kind}.
PLANNED_FUNCTIONS = {gf.sequence_keep_index: "sequence_keep_index"}

#: Names of the values at the cut, as the exported graphs call them.
VISUAL_EMBEDS, VISUAL_INDEX, VISUAL_SLOTS = "visual_embeds", "visual_index", "visual_slots"


@dataclass
class PlannedInput:
    """An LLM-graph input the runtime computes in numpy (a lifted planning node)."""

    name: str
    """Input name in the LLM graph (the node's name)."""
    kind: str
    """What computes it: a key of :data:`PLANNED_FUNCTIONS`' values (``"sequence_keep_index"``)."""


@dataclass
class PrefillSplit:
    """The two halves of a prefill graph."""

    vision: fx.GraphModule
    """Vision graph: placeholders are a subset of the prefill's; returns (visual_embeds[, visual_index])."""
    llm: fx.GraphModule
    """LLM graph: the prefill's LLM placeholders, plus visual_embeds, visual_slots and planned inputs."""
    pruned: bool
    """Does the vision graph choose tokens (so it returns ``visual_index``)?"""
    planned: list[PlannedInput] = field(default_factory=list)
    """LLM inputs the runtime plans in numpy, in placeholder order."""
    row_bound: list[str] = field(default_factory=list)
    """LLM nodes that read the layout until bound to one image per row (``bind_visual_rows``)."""

    @property
    def vision_inputs(self) -> list[str]:
        return [n.target for n in self.vision.graph.nodes if n.op == "placeholder"]

    @property
    def llm_inputs(self) -> list[str]:
        return [n.target for n in self.llm.graph.nodes if n.op == "placeholder"]


def _is_vision(node: fx.Node) -> bool:
    return node.op not in ("placeholder", "output") and node.meta.get("stage") in VISION_STAGES


def split_prefill(module: fx.GraphModule, row_bound: Collection[Callable] = ()) -> PrefillSplit:
    """Cut ``module`` (a ``prefill`` stage graph, passes applied) at the visual merge; LLM nodes calling a
    function in ``row_bound`` (the passes' export bindings) may read the layout until bound."""
    nodes = list(module.graph.nodes)
    merges = [n for n in nodes if n.meta.get("role") == "merge"]
    if len(merges) != 1:
        raise ExportError(f"the prefill graph has {len(merges)} merge nodes; the export cuts at exactly one")
    merge = merges[0]
    _, tokens, slots = merge.args[:3]
    if not _is_vision(tokens):
        raise ExportError(f"the merge reads visual tokens from {tokens.name}, which is not a vision node")
    pruned = _is_vision(slots)
    if not pruned and not (slots.op == "placeholder" and slots.target == "visual_positions"):
        raise ExportError(f"the merge reads its slots from {slots.name}: expected a vision node or the visual_positions input")

    vision = {n for n in nodes if _is_vision(n)}
    planned = [n for n in nodes if n.op == "call_function" and n.target in PLANNED_FUNCTIONS and n not in vision]
    for node in planned:
        if node.args[0] is not _placeholder(nodes, "visual_positions") or node.args[1] is not slots:
            raise ExportError(
                f"{node.name} = {node.target.__name__}(...) must read (visual_positions, the merge's slots) "
                "for the runtime to plan it"
            )
    cut = {tokens: VISUAL_EMBEDS, slots: VISUAL_SLOTS}
    llm = [n for n in nodes if n.op != "placeholder" and n not in vision and n not in planned]
    bound = [n for n in llm if n.op == "call_function" and n.target in row_bound]
    # what the bound nodes read as their layout: the input, or a vision pass's pruned layout
    layouts = {a for n in bound for a in args_of(n) if a in vision or (a.op == "placeholder" and a.target == "layout")}
    for node in llm:
        for arg in args_of(node):
            if node in bound and arg in layouts:
                continue
            if arg in vision and arg not in cut:
                raise ExportError(
                    f"LLM node {node.name} reads the vision value {arg.name}: the export cuts the prefill at the "
                    f"merge, so only the merged tokens and their slots may cross (write the pass so they do)"
                )
            if arg.op == "placeholder" and arg.target == "layout" and node.op != "output":
                raise ExportError(
                    f"LLM node {node.name} reads the VisualLayout, so its shapes are fixed by the prompt: add its "
                    f"function to vlmopt.export.split.PLANNED_FUNCTIONS with a numpy planner, or keep it in the vision stage"
                )
    return PrefillSplit(
        vision=_vision_graph(module, nodes, vision, tokens, slots if pruned else None),
        llm=_llm_graph(module, nodes, llm, planned, cut, {n: layouts for n in bound}),
        pruned=pruned,
        planned=[PlannedInput(n.name, PLANNED_FUNCTIONS[n.target]) for n in planned],
        row_bound=[n.name for n in bound],
    )


def _placeholder(nodes: list[fx.Node], name: str) -> fx.Node | None:
    return next((n for n in nodes if n.op == "placeholder" and n.target == name), None)


def _vision_graph(module, nodes, vision, tokens, index) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    used = {arg for node in vision for arg in args_of(node)}
    for node in nodes:
        if node.op == "placeholder" and node in used:
            env[node] = graph.node_copy(node)
    for node in nodes:
        if node in vision:
            env[node] = graph.node_copy(node, env.__getitem__)
    outputs = (env[tokens],) if index is None else (env[tokens], env[index])
    graph.output(outputs)
    return _pruned_module(module, graph, "vision")


def _llm_graph(module, nodes, llm, planned, cut, bound) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    layouts = set().union(*bound.values())
    used = {arg for node in llm for arg in args_of(node) if arg not in bound.get(node, ())}
    originals = [n for n in nodes if n.op == "placeholder" and n in used and n not in cut]
    text = [n for n in originals if n.target not in ("cache", "logits_to_keep")]
    tail = [n for n in originals if n.target in ("cache", "logits_to_keep")]
    for node in text:
        env[node] = graph.node_copy(node)
    if layouts:
        layout = next((env[n] for n in text if n.target == "layout"), None)
        if layout is None:
            layout = graph.placeholder("layout")
            layout.meta.update(role="input", stage="input")
        env.update({source: layout for source in layouts if source not in env})
    for source, name in cut.items():
        env[source] = graph.placeholder(name)
        env[source].meta.update(role="input", stage="llm")
    for node in planned:
        env[node] = graph.placeholder(node.name)
        env[node].meta.update(node.meta)
    for node in tail:
        env[node] = graph.node_copy(node)
    for node in llm:
        env[node] = graph.node_copy(node, env.__getitem__)
    return _pruned_module(module, graph, "llm")


def _pruned_module(root, graph: fx.Graph, name: str) -> fx.GraphModule:
    """A GraphModule of ``graph`` without dead nodes (e.g. a pass's unused side outputs)."""
    result = fx.GraphModule(root, graph, name)
    result.graph.eliminate_dead_code()
    result.delete_all_unused_submodules()
    result.recompile()
    return result
