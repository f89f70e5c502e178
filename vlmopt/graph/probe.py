"""Run a stage graph node by node and keep the values of chosen nodes (for tools and tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx


class _Probe(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, wanted: Callable[[fx.Node], bool], around=None) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.wanted = wanted
        self.around = around
        self.values: dict[str, Any] = {}

    def run_node(self, node: fx.Node) -> Any:
        if self.around is None:
            value = super().run_node(node)
        else:
            with self.around(node):
                value = super().run_node(node)
        if self.wanted(node):
            self.values[node.name] = value
        return value


def inputs_in_order(module: fx.GraphModule, kwargs: dict[str, Any]) -> list[Any]:
    """``kwargs`` as the positional arguments of ``module``'s placeholders."""
    return [kwargs[node.target] for node in module.graph.nodes if node.op == "placeholder"]


def run_with_probes(
    module: fx.GraphModule,
    kwargs: dict[str, Any],
    wanted: Callable[[fx.Node], bool],
    around: Callable[[fx.Node], Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Run ``module`` on ``kwargs``; return its output and ``{node name: value}`` of wanted nodes.

    ``around(node)``, if given, returns a context manager entered while the node runs (the FLOPs
    counter uses it to attribute each node to its stage).
    """
    probe = _Probe(module, wanted, around)
    output = probe.run(*inputs_in_order(module, kwargs))
    return output, probe.values
