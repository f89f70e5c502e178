"""``vlmopt.compile``: capture a HF VLM as pipeline graphs and rewrite them with passes."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from vlmopt import passes as passes_module
from vlmopt.adapters import adapter_for
from vlmopt.errors import PassConfigError
from vlmopt.graph.edit import inserting_for
from vlmopt.graph.pipeline import VLMGraph
from vlmopt.passes.base import Pass, check_stages
from vlmopt.runtime import BACKENDS, CompiledVLM


def compile(  # noqa: A001
    model: nn.Module, passes: Sequence[Pass | str] = (), backend: str = "eager", *, training: bool = False
) -> CompiledVLM:
    """Compile ``model`` with ``passes`` (instances or specs like ``"random_prune:keep_ratio=0.5"``).

    Before anything is traced, the pass list is checked as a whole (vision-stage passes before
    llm/kv-stage ones, at most one kv-stage pass, train-stage passes only with ``training=True``,
    for a training graph) and every pass against the model and the passes before it; the model
    itself is never modified. Nodes a pass inserts carry its name in ``node.meta["pass"]``.
    """
    if backend not in BACKENDS:
        raise PassConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    adapter = adapter_for(model)
    resolved = [passes_module.resolve(item) for item in passes]
    check_stages(resolved, training)
    for position, item in enumerate(resolved):
        item.check(adapter, resolved[:position])
    graph = VLMGraph.capture(adapter)
    for item in resolved:
        with inserting_for(type(item).__name__):
            item.apply(graph)
    graph.recompile()
    return CompiledVLM(model, adapter, graph, resolved, backend, training)
