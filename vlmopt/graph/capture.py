"""Capture a pipeline module (an adapter's prefill / decode step) as a ``torch.fx.GraphModule``.

Every Hugging Face submodule the pipeline calls becomes one ``call_module`` node (the tracer treats
all submodules as leaves), so data-dependent code inside HF modules never reaches the tracer, and
the graph shares its weights with the model. Functions of :mod:`vlmopt.graph.functions` stay single
``call_function`` nodes. While tracing, ``with role(...)`` tags every node it creates with a role
(and a layer index), and :func:`mark` records which dims of a value are batch and sequence, so
passes find their place by role, not by HF attribute names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import fx, nn

from vlmopt.graph import functions

_CURRENT_ROLE: ContextVar[tuple[str, int | None] | None] = ContextVar("vlmopt_current_role", default=None)

#: Readable names for the traced tensor-expression nodes of these roles (module calls keep theirs).
NODE_NAME_OF_ROLE = {"feature_select": "features", "visual_tokens": "visual_tokens", "visual_pack": "visual_slots"}

#: Stage of the model each role belongs to (the FLOPs report groups by it).
STAGE_OF_ROLE = {
    "vision_input": "vision",
    "vision_embed": "vision",
    "vision_norm": "vision",
    "vision_rope": "vision",
    "window_permute": "vision",
    "vision_block": "vision",
    "feature_select": "vision",
    "visual_tokens": "vision",
    "merger": "projector",
    "deepstack_merger": "projector",
    "projector": "projector",
    "visual_pack": "projector",
    "embed": "llm",
    "merge": "llm",
    "deepstack_scatter": "llm",
    "deepstack": "llm",
    "causal_mask": "llm",
    "rope": "llm",
    "decoder_layer": "llm",
    "final_norm": "llm",
    "keep_last": "lm_head",
    "lm_head": "lm_head",
    "input": "input",
    "output": "output",
}


@contextmanager
def role(name: str, index: int | None = None) -> Iterator[None]:
    """Tag the nodes traced inside the block with ``node.meta['role']`` (and ``'index'``)."""
    token = _CURRENT_ROLE.set((name, index))
    try:
        yield
    finally:
        _CURRENT_ROLE.reset(token)


def mark(value: Any, **meta: Any) -> Any:
    """Record ``meta`` on the node that produces ``value`` (no-op outside tracing)."""
    if isinstance(value, fx.Proxy):
        value.node.meta.update(meta)
    return value


class PipelineTracer(fx.Tracer):
    """FX tracer that keeps every submodule of the traced pipeline whole."""

    def __init__(self) -> None:
        super().__init__(autowrap_modules=(math, functions))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name != ""

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        current = _CURRENT_ROLE.get()
        if current is not None and "role" not in node.meta:
            node.meta["role"], index = current
            if index is not None:
                node.meta["index"] = index
        return node


def capture(pipeline: nn.Module, name: str) -> fx.GraphModule:
    """Trace ``pipeline`` into a GraphModule whose nodes all carry ``role`` and ``stage`` meta."""
    tracer = PipelineTracer()
    graph = tracer.trace(pipeline)
    module = fx.GraphModule(tracer.root, graph, name)
    for node in module.graph.nodes:
        if node.op == "placeholder":
            node.meta.setdefault("role", "input")
        elif node.op == "output":
            node.meta["role"] = "output"
        node_role = node.meta.get("role")
        if node_role is None:
            raise RuntimeError(f"{name}: node {node.name} was traced outside a role() block")
        node.meta.setdefault("stage", STAGE_OF_ROLE.get(node_role, "llm"))
    last_of_role = {n.meta["role"]: n for n in module.graph.nodes if n.op in ("call_function", "call_method")}
    for node_role, name in NODE_NAME_OF_ROLE.items():
        if node_role in last_of_role:
            last_of_role[node_role]._rename(name)
    module.recompile()
    return module


def args_of(node: fx.Node) -> list[fx.Node]:
    """The nodes ``node`` reads, in argument order (flattening tuples, lists and dicts)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def describe_target(node: fx.Node) -> str:
    """A short readable name of what a node calls."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return f"{target.namespace}.{target._opname}"
        if isinstance(target, torch._ops.OpOverloadPacket):
            return target._qualified_op_name.replace("::", ".")
        module = getattr(target, "__module__", "") or ""
        qualname = getattr(target, "__qualname__", getattr(target, "__name__", repr(target)))
        if module in ("_operator", "operator"):
            return f"operator.{qualname}"
        if module.startswith("torch") or "_VariableFunctions" in qualname:
            return f"torch.{getattr(target, '__name__', qualname)}"
        return qualname
    return node.op
