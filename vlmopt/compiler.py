"""``vlmopt.compile``: capture a HF VLM as pipeline graphs and rewrite them with passes."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from vlmopt import passes as passes_module
from vlmopt.adapters import adapter_for
from vlmopt.errors import PassConfigError
from vlmopt.graph.pipeline import VLMGraph
from vlmopt.passes.base import Pass
from vlmopt.runtime import BACKENDS, CompiledVLM


def compile(model: nn.Module, passes: Sequence[Pass | str] = (), backend: str = "eager") -> CompiledVLM:  # noqa: A001
    """Compile ``model`` with ``passes`` (instances or specs like ``"random_prune:keep_ratio=0.5"``).

    Every pass is validated against the model and the passes before it before anything is traced;
    the model itself is never modified.
    """
    if backend not in BACKENDS:
        raise PassConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    adapter = adapter_for(model)
    resolved = [passes_module.resolve(item) for item in passes]
    for position, item in enumerate(resolved):
        item.check(adapter, resolved[:position])
    graph = VLMGraph.capture(adapter)
    for item in resolved:
        item.apply(graph)
    graph.recompile()
    return CompiledVLM(model, adapter, graph, resolved, backend)
