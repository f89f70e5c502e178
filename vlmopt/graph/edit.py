"""Graph editing that every pass shares: find nodes by role, insert, re-route the sequence.

:meth:`GraphEditor.reroute_sequence` is the bookkeeping DESIGN.md calls the correctness crux: once
a pass decides which tokens of the LLM sequence survive, every value that carries the sequence
dimension (hidden states, the 2-D attention mask, position ids, cos/sin) is gathered with the same
index, and 4-D masks built earlier are rebuilt from the gathered 2-D mask. Gathering the original
position ids is what keeps pruned tokens at their original positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import fx

from vlmopt.graph.capture import STAGE_OF_ROLE

#: Roles whose nodes are rebuilt, not gathered, when the sequence shrinks after them.
REBUILT_ROLES = ("causal_mask",)

#: Prefix of the 2-D mask of the layers from a cut on: the prefill returns ``attention_mask_from_<K>``
#: for a cut before decoder layer K, and the decode graph reads it back (extended by one) as an input.
SEGMENT_MASK_PREFIX = "attention_mask_from_"


def segment_mask_name(layer: int) -> str:
    """Output / input name of the 2-D mask serving decoder layers ``layer`` on (a cut's segment)."""
    return f"{SEGMENT_MASK_PREFIX}{layer}"


def segment_mask_inputs(module: fx.GraphModule) -> list[str]:
    """Names of the graph's per-segment 2-D mask inputs (decode graphs of models cut inside the LLM)."""
    return [n.target for n in module.graph.nodes if n.op == "placeholder" and n.target.startswith(SEGMENT_MASK_PREFIX)]

_CURRENT_PASS: ContextVar[str | None] = ContextVar("vlmopt_current_pass", default=None)


@contextmanager
def inserting_for(pass_name: str):
    """Tag every node a :class:`GraphEditor` inserts inside the block with ``meta["pass"] = pass_name``
    (``compile`` wraps each pass's ``apply`` in it, so errors can name the pass behind a node)."""
    token = _CURRENT_PASS.set(pass_name)
    try:
        yield
    finally:
        _CURRENT_PASS.reset(token)


def parameter_names(module: fx.GraphModule, node: fx.Node) -> list[str]:
    """Parameter names of what ``node`` calls, in order: a torch op's ``_schema``, else the Python
    signature (of the submodule's ``forward`` for ``call_module``)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = target.default
    if isinstance(target, torch._ops.OpOverload):
        return [argument.name for argument in target._schema.arguments]
    function = module.get_submodule(target).forward if node.op == "call_module" else target
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        raise LookupError(f"{node.name}: cannot read the parameter names of {target!r}") from None
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


class GraphEditor:
    """Edits one stage GraphModule; call :meth:`finish` when done."""

    def __init__(self, module: fx.GraphModule) -> None:
        self.module = module
        self.graph = module.graph

    # ----- finding ------------------------------------------------------------------------
    def nodes(self, role: str, index: int | None = None) -> list[fx.Node]:
        return [
            n
            for n in self.graph.nodes
            if n.meta.get("role") == role and (index is None or n.meta.get("index") == index)
        ]

    def one(self, role: str, index: int | None = None) -> fx.Node:
        found = self.nodes(role, index)
        if len(found) != 1:
            where = role if index is None else f"{role}[{index}]"
            raise LookupError(f"{self.module.__class__.__name__}: expected one {where} node, found {len(found)}")
        return found[0]

    def last(self, role: str) -> fx.Node | None:
        found = self.nodes(role)
        return found[-1] if found else None

    def placeholder(self, name: str) -> fx.Node:
        for node in self.graph.nodes:
            if node.op == "placeholder" and node.target == name:
                return node
        raise LookupError(f"graph has no input {name!r}")

    def add_input(self, name: str, **meta: Any) -> fx.Node:
        """A new graph input ``name`` after those without a default (an optional mask input stays last), tagged with ``meta``."""
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        required = [n for n in placeholders if not n.args]
        with self.graph.inserting_after(required[-1] if required else placeholders[0].prev):
            node = self.graph.placeholder(name)
        node.meta.update(meta)
        self._tag(node)
        return node

    def output(self) -> fx.Node:
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    def order(self) -> dict[fx.Node, int]:
        return {node: i for i, node in enumerate(self.graph.nodes)}

    # ----- arguments by name --------------------------------------------------------------
    def _position(self, node: fx.Node, name: str) -> int:
        names = parameter_names(self.module, node)
        if name not in names:
            raise LookupError(f"{node.name} calls {node.target!r}, which has no parameter {name!r} ({', '.join(names)})")
        return names.index(name)

    def input_of(self, node: fx.Node, name: str) -> Any:
        """The argument ``node`` passes as parameter ``name`` (positionally or as keyword)."""
        if name in node.kwargs:
            return node.kwargs[name]
        position = self._position(node, name)
        if position < len(node.args):
            return node.args[position]
        raise LookupError(f"{node.name} does not pass {name!r} (it takes the default)")

    def set_input(self, node: fx.Node, name: str, value: Any) -> None:
        """Make ``node`` pass ``value`` as parameter ``name``, where it passed it before."""
        if name in node.kwargs:
            node.update_kwarg(name, value)
            return
        position = self._position(node, name)
        if position < len(node.args):
            node.update_arg(position, value)
        else:
            node.update_kwarg(name, value)

    # ----- inserting ----------------------------------------------------------------------
    def insert(
        self,
        after: fx.Node,
        target: Callable[..., Any],
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        role: str,
        stage: str | None = None,
        name: str | None = None,
        **meta: Any,
    ) -> fx.Node:
        """Insert ``target(*args, **kwargs)`` right after ``after``, named ``name`` (made unique),
        tagged with ``role``, ``stage`` and ``meta``."""
        with self.graph.inserting_after(after):
            node = self.graph.create_node("call_function", target, args, kwargs or {}, name=name)
        node.meta.update(meta)
        node.meta["role"] = role
        node.meta["stage"] = stage or STAGE_OF_ROLE.get(role, after.meta.get("stage", "llm"))
        self._tag(node)
        return node

    def insert_module(self, after: fx.Node, target: str, args: tuple, *, role: str, stage: str, name: str | None = None) -> fx.Node:
        """Insert a call of the graph's submodule ``target`` (a dotted path) right after ``after``."""
        self.module.get_submodule(target)  # a clear error if the path does not exist
        with self.graph.inserting_after(after):
            node = self.graph.create_node("call_module", target, args, {}, name=name)
        node.meta.update(role=role, stage=stage)
        self._tag(node)
        return node

    def copy_node(self, node: fx.Node, *, after: fx.Node, replace: dict | None = None, **meta: Any) -> fx.Node:
        """A copy of ``node`` placed right after ``after``, reading ``replace[arg]`` for each argument
        in ``replace``; its meta is ``node``'s updated with ``meta``, and it is tagged with the pass."""
        replace = replace or {}
        with self.graph.inserting_after(after):
            copy = self.graph.node_copy(node, lambda arg: replace.get(arg, arg))
        copy.meta = {**node.meta, **meta}
        self._tag(copy)
        return copy

    @staticmethod
    def _tag(node: fx.Node) -> None:
        current = _CURRENT_PASS.get()
        if current is not None:
            node.meta["pass"] = current

    def chain(self, after: fx.Node) -> Inserter:
        """An :class:`Inserter` that appends nodes one after the other, starting after ``after``."""
        return Inserter(self, after)

    def replace_uses(self, old: fx.Node, new: fx.Node, *, after: fx.Node) -> int:
        """Make every user of ``old`` placed after ``after`` read ``new`` instead; returns the count."""
        order = self.order()
        users = [u for u in list(old.users) if order[u] > order[after] and u is not new]
        for user in users:
            user.replace_input_with(old, new)
        return len(users)

    # ----- the sequence -------------------------------------------------------------------
    def reroute_sequence(self, point: fx.Node, index: fx.Node) -> list[fx.Node]:
        """Gather every sequence-carrying value live after ``index`` with it; returns the gathers.

        ``index`` is a [B, S'] node placed after ``point``. Values produced up to ``point`` and read
        after it are gathered (``vlmopt::gather_sequence``); 4-D masks among them are rebuilt.
        """
        order = self.order()
        limit = order[point]
        gathered: dict[fx.Node, fx.Node] = {}
        cursor = index
        for node in list(self.graph.nodes):
            if order[node] > limit:
                break
            dims = node.meta.get("seq_dim")
            if dims is None or not self._read_after(node, order, limit, index):
                continue
            cursor = self.insert(
                cursor,
                torch.ops.vlmopt.gather_sequence.default,
                (node, index, dims[0], dims[1]),
                role="sequence_gather",
                stage=node.meta.get("stage"),
                name=f"{node.name}_kept",
                seq_dim=dims,
            )
            gathered[node] = cursor
        for node in list(self.graph.nodes):
            if order.get(node, limit + 1) > limit:
                break
            if node.meta.get("role") in REBUILT_ROLES and self._read_after(node, order, limit, index):
                gathered[node] = cursor = self.copy_node(node, after=cursor, replace=gathered)
        self._read_gathered(gathered, index, order, limit)
        return list(gathered.values())

    @staticmethod
    def _read_gathered(gathered: dict[fx.Node, fx.Node], index: fx.Node, order: dict[fx.Node, int], limit: int,
                       skip: fx.Node | None = None) -> None:
        """Make every node after position ``limit`` (but the gathers, ``index`` and ``skip``) read the
        gathered value of each ``gathered`` key instead of the key."""
        created = set(gathered.values()) | {index, skip}
        for old, new in gathered.items():
            for user in list(old.users):
                if user not in created and order.get(user, -1) > limit:
                    user.replace_input_with(old, new)

    @staticmethod
    def _read_after(node: fx.Node, order: dict[fx.Node, int], limit: int, index: fx.Node) -> bool:
        return any(order.get(user, -1) > limit and user is not index for user in node.users)

    # ----- cuts between decoder layers ----------------------------------------------------
    def visual_span(self, layout: fx.Node | None = None) -> fx.Node:
        """The [B, S] bool mask of the visual tokens in the LLM sequence as it stands at the last cut.

        Built on first use from the merge's slots (and the vision-side ``sequence_index``, if any),
        marked with ``seq_dim`` so every later cut carries it along (:meth:`cut_sequence`). Given the
        ``layout`` node of the merged tokens, the span leaves their structural tokens out.
        """
        spans = [n for n in self.graph.nodes if n.meta.get("visual_span")]
        if spans:
            return spans[-1]
        from vlmopt.graph import functions as gf

        merge = self.one("merge")
        first_layer = min(self.nodes("decoder_layer"), key=lambda n: n.meta["index"])
        order = self.order()
        positions = self.input_of(merge, "positions")
        after = first_layer.prev if layout is None else max(first_layer.prev, layout, key=order.__getitem__)
        chain = self.chain(after)
        if layout is not None:
            positions = chain(gf.grid_positions, positions, layout, role="visual_span", stage="llm", name="visual_grid_positions")
        meta = {"seq_dim": (0, 1), "visual_span": True}
        span = chain(
            gf.visual_span_mask, self.input_of(merge, "embeds"), positions,
            role="visual_span", stage="llm", name="visual_span", meta=meta,
        )
        index = self.last("sequence_index")
        if index is not None:
            span = chain(
                torch.ops.vlmopt.gather_sequence.default, span, index, 0, 1,
                role="visual_span", stage="llm", name="visual_span_kept", meta=meta,
            )
        return span

    def cut_sequence(self, layer: int, index: fx.Node) -> list[fx.Node]:
        """Keep the sequence slots ``index`` [B, S'] (ascending, -1 = padding) from decoder layer
        ``layer`` on; returns the gathers.

        ``index`` sits between decoder layers ``layer - 1`` and ``layer``. Every sequence-carrying
        value those later layers read (hidden states, cos/sin, the visual span) is gathered with it;
        the 4-D masks they read are rebuilt from the gathered 2-D mask and states with
        ``layer_idx=layer``, so they measure that layer's own KV cache (shorter than the earlier
        layers'). The prefill returns the gathered 2-D mask as :func:`segment_mask_name` (the
        first segment's mask stays ``attention_mask``); :meth:`split_decode_masks` gives the decode
        graph the matching input.
        """
        layers = {n.meta["index"]: n for n in self.nodes("decoder_layer")}
        if layer not in layers or layer - 1 not in layers:
            raise ValueError(f"a cut needs decoder layers {layer - 1} and {layer}; the graph has 0..{max(layers)}")
        span = self.visual_span() if self.nodes("merge") else None  # built before the order is taken
        order = self.order()
        point = index.prev
        if not order[layers[layer - 1]] <= order[point] < order[layers[layer]]:
            raise ValueError(f"{index.name} must sit between decoder layers {layer - 1} and {layer}")
        limit = order[point]
        output = self.output()
        later = [n for n in self.graph.nodes if order[n] > limit and n is not output]
        masks = {m for n in later for m in n.all_input_nodes if m.meta.get("role") == "causal_mask" and order[m] <= limit}
        wanted = {m for n in later for m in n.all_input_nodes if order[m] <= limit and m.meta.get("seq_dim")}
        wanted |= {value for m in masks for value in self._mask_sequence_inputs(m)}
        if span is not None:
            wanted.add(span)
        wanted.discard(index)
        gathered: dict[fx.Node, fx.Node] = {}
        cursor = index
        for node in sorted(wanted, key=order.__getitem__):
            dims = node.meta["seq_dim"]
            cursor = self.insert(
                cursor, torch.ops.vlmopt.gather_sequence.default, (node, index, dims[0], dims[1]),
                role="sequence_gather", stage="llm", name=f"{node.name}_kept", seq_dim=dims,
                **({"visual_span": True} if node.meta.get("visual_span") else {}),
            )
            gathered[node] = cursor
        hidden = gathered[self.input_of(layers[layer], "hidden_states")]
        for mask in sorted(masks, key=order.__getitem__):
            first = min(u.meta["index"] for u in mask.users if u.meta.get("role") == "decoder_layer" and order[u] > limit)
            rebuilt = self._segment_mask(mask, cursor, layer, gathered, first)
            self.set_input(rebuilt, "embeds", hidden)
            gathered[mask] = cursor = rebuilt
        self._read_gathered(gathered, index, order, limit, skip=output)  # the first segment keeps its mask
        first_mask = self.input_of(min(masks, key=order.__getitem__), "attention_mask")
        outputs = dict(output.args[0])
        outputs[segment_mask_name(layer)] = gathered[first_mask]
        output.args = (outputs,)
        return list(gathered.values())

    def _mask_sequence_inputs(self, mask: fx.Node) -> list[fx.Node]:
        """The sequence inputs a causal-mask node builds from, besides the states it is sized on: its 2-D
        mask, and any extra mask input (block ids of bidirectional spans)."""
        embeds = self.input_of(mask, "embeds")
        return [value for value in mask.all_input_nodes if value is not embeds and value.meta.get("seq_dim")]

    def _segment_mask(self, mask: fx.Node, after: fx.Node, segment: int, gathered: dict[fx.Node, fx.Node], layer_idx: int) -> fx.Node:
        """A copy of causal-mask node ``mask``, placed after ``after``, that builds the 4-D mask of the
        decoder layers from ``segment`` on from their own sequence inputs (``gathered``: each of the mask's
        sequence inputs → its value for those layers) and cache (``layer_idx``)."""
        rebuilt = self.copy_node(mask, after=after, segment=segment)
        for value in self._mask_sequence_inputs(mask):
            rebuilt.replace_input_with(value, gathered[value])
        self.set_input(rebuilt, "layer_idx", layer_idx)
        return rebuilt

    def split_decode_masks(self, layer: int) -> fx.Node:
        """In a decode graph, serve decoder layers ``layer`` on with their own 2-D mask input
        (:func:`segment_mask_name`, [B, cache length of layer ``layer`` + 1]); returns the input."""
        layers = [n for n in self.nodes("decoder_layer") if n.meta["index"] >= layer]
        order = self.order()
        masks = {m for n in layers for m in n.all_input_nodes if m.meta.get("role") == "causal_mask"}
        mask_input = self.add_input(segment_mask_name(layer), role="input", stage="input", seq_dim=(0, 1))
        for mask in sorted(masks, key=order.__getitem__):
            first = min(u.meta["index"] for u in mask.users if u in layers)
            inputs = {value: value for value in self._mask_sequence_inputs(mask)}  # a decode step's other mask inputs stay
            inputs[self.input_of(mask, "attention_mask")] = mask_input
            rebuilt = self._segment_mask(mask, mask, layer, inputs, first)
            for user in list(mask.users):
                if user in layers:
                    user.replace_input_with(mask, rebuilt)
        return mask_input

    def finish(self) -> None:
        self.graph.lint()
        self.module.recompile()


class Inserter:
    """Appends nodes in order after a starting node (see :meth:`GraphEditor.chain`).

    ``chain(torch.sum, x, dim=1, role="score", meta={"seq_dim": (0, 1)})`` inserts ``torch.sum(x, dim=1)``:
    keywords other than ``role``, ``stage``, ``name`` and ``meta`` go to the target, never into the
    node's metadata (``meta`` does).
    """

    def __init__(self, editor: GraphEditor, after: fx.Node) -> None:
        self.editor = editor
        self.cursor = after

    def __call__(
        self, target: Callable[..., Any], *args: Any, role: str, stage: str | None = None, name: str | None = None,
        meta: dict[str, Any] | None = None, **kwargs: Any,
    ) -> fx.Node:
        self.cursor = self.editor.insert(self.cursor, target, args, kwargs, role=role, stage=stage, name=name, **(meta or {}))
        return self.cursor

    def module(self, target: str, *args: Any, role: str, stage: str, name: str | None = None) -> fx.Node:
        self.cursor = self.editor.insert_module(self.cursor, target, args, role=role, stage=stage, name=name)
        return self.cursor
