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


#: What ``compile`` builds: ``infer`` (prefill and decode graphs) or ``train`` (also the training
#: graphs, whose forward takes ``labels`` and returns the loss).
MODES = ("infer", "train")


def compile(  # noqa: A001
    model: nn.Module,
    passes: Sequence[Pass | str] = (),
    backend: str = "eager",
    *,
    mode: str = "infer",
    training: bool = False,
) -> CompiledVLM:
    """Compile ``model`` with ``passes`` (instances or specs like ``"random_prune:keep_ratio=0.5"``).

    ``mode="train"`` (``training=True`` is the same) also captures the training graphs
    (:mod:`vlmopt.graph.training`): ``forward(**batch, labels=labels)`` then returns the loss, and
    gradients reach the model's own parameters. Vision-stage passes rewrite the inference and the
    training graphs alike; kv-stage passes only the inference graphs (training runs without a cache).

    Before anything is traced, the pass list is checked as a whole (vision-stage passes before
    llm/kv-stage ones, at most one kv-stage pass, train-stage passes last and only with
    ``mode="train"``) and every pass against the model and the passes before it; a pass whose settings
    are measured on the model (``HalfV(ivr_layer="auto")``) is then made concrete
    (:meth:`Pass.specialize`), and ``CompiledVLM.passes`` holds the concrete configs. The model itself
    is never modified. Nodes a pass inserts carry its name in ``node.meta["pass"]``.
    """
    if backend not in BACKENDS:
        raise PassConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if mode not in MODES:
        raise PassConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if training:
        mode = "train"
    adapter = adapter_for(model)
    resolved = [passes_module.resolve(item) for item in passes]
    check_stages(resolved, mode == "train")
    for position, item in enumerate(resolved):
        item.check(adapter, resolved[:position])
        concrete = item.specialize(adapter, resolved[:position])
        if concrete is not item:
            concrete.check(adapter, resolved[:position])
            resolved[position] = concrete
    graph = VLMGraph.capture(adapter, mode=mode, chunk=any(item.stage == "kv" for item in resolved))
    for item in resolved:
        with inserting_for(type(item).__name__):
            item.apply(graph)
            if mode == "train" and item.stage == "vision":
                item.apply(graph.training_view())
    graph.recompile()
    return CompiledVLM(model, adapter, graph, resolved, backend, mode == "train")
