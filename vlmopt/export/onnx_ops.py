"""The ONNX translations of the ``vlmopt::`` ops a graph holds, collected from the op files.

Each op file defines ``onnx_translation``: a zero-argument function that imports onnxscript lazily
and returns a trace-only onnxscript function written with standard ONNX ops only (fixed-k
``TopK(sorted=1)``, ``Gather``, ``ScatterND``, ``MatMul``, constants), so TensorRT's ONNX parser
reads the result without a plugin; or ``None`` when the op has no ONNX form. The table is built
from the ops the graph being exported actually runs (found by running it once on its example
inputs), so an op without translation only stops the exports of graphs that hold it, with an
error naming the op and the pass that inserted it (``node.meta["pass"]``, set by ``compile``).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from vlmopt.errors import MissingDependencyError
from vlmopt.export.errors import ExportError


class _OpRecorder(TorchDispatchMode):
    """Records every ``vlmopt::`` op that runs, with the passes of the FX nodes that ran it."""

    def __init__(self) -> None:
        super().__init__()
        self.node: fx.Node | None = None
        self.found: dict[str, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", None) == "vlmopt":
            passes = self.found.setdefault(func.name(), set())
            if self.node is not None and "pass" in self.node.meta:
                passes.add(self.node.meta["pass"])
        return func(*args, **(kwargs or {}))


class _NodeInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, recorder: _OpRecorder) -> None:
        super().__init__(module)
        self.recorder = recorder

    def run_node(self, node: fx.Node):
        outer, self.recorder.node = self.recorder.node, node
        try:
            return super().run_node(node)
        finally:
            self.recorder.node = outer


def ops_in(module: nn.Module, example: Sequence) -> dict[str, set[str]]:
    """``{"vlmopt::<op>": names of the passes whose nodes ran it}`` for one run of ``module(*example)``.

    Every ``torch.fx.GraphModule`` inside ``module`` runs node by node for the run, so each op is
    traced back to the node (and the pass) that called it.
    """
    recorder = _OpRecorder()
    graphs = [m for m in module.modules() if isinstance(m, fx.GraphModule)]

    def interpreted(graph_module: fx.GraphModule):
        signature = inspect.signature(graph_module.forward)

        def forward(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return _NodeInterpreter(graph_module, recorder).run(*bound.arguments.values())

        return forward

    for graph_module in graphs:
        graph_module.forward = interpreted(graph_module)
    try:
        with torch.no_grad(), recorder:
            module(*example)
    finally:
        for graph_module in graphs:
            del graph_module.forward
    return recorder.found


def translation_of(qualname: str) -> Callable | None:
    """The ``onnx_translation`` of the op file that registers ``qualname`` (``vlmopt::<op>``)."""
    from torch._library.custom_ops import OPDEFS

    definition = OPDEFS.get(qualname)
    module = sys.modules.get(definition._init_fn.__module__) if definition is not None else None
    if module is None or not hasattr(module, "onnx_translation"):
        raise ExportError(f"{qualname} has no op file defining onnx_translation (see the op-file convention in vlmopt/ops/)")
    return module.onnx_translation


def translation_table(module: nn.Module, example: Sequence, graph_name: str) -> dict[Callable, Callable]:
    """``{torch.ops.vlmopt.<op>.default: onnxscript function}`` for the ops ``module`` runs, for
    ``torch.onnx.export``'s ``custom_translation_table``.

    Raises :class:`ExportError` naming any op there whose file sets ``onnx_translation = None``,
    and the pass that inserted it.
    """
    try:
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(
            f"ONNX export needs onnxscript ({error}); install it with: pip install 'vlmopt[onnx]'"
        ) from error
    table = {}
    for qualname, passes in sorted(ops_in(module, example).items()):
        translate = translation_of(qualname)
        if translate is None:
            by = f"inserted by {', '.join(sorted(passes))}" if passes else "in the captured model"
            raise ExportError(
                f"the {graph_name} graph holds {qualname} ({by}), which has no ONNX translation "
                f"(vlmopt/ops/{qualname.split('::')[1]}.py sets onnx_translation = None); export without that pass, "
                "or give the op file an onnx_translation"
            )
        namespace, name = qualname.split("::")
        table[getattr(getattr(torch.ops, namespace), name).default] = translate()
    return table
