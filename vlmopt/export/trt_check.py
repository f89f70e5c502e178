"""Would TensorRT 10's ONNX parser accept this graph? A check that needs neither TensorRT nor a GPU.

:func:`check_tensorrt` parses an ONNX file with ``onnx`` and checks every node (subgraphs and
model-local functions included) against the rules below, reporting each offending node by name.
``vlmopt export`` refuses to call a graph TensorRT-ready while any *error* remains.

Rules (TensorRT 10 ONNX parser, ``onnx-tensorrt`` operator support matrix; ENVIRONMENT.md):

=================  =========================================================================
rule               what is rejected
=================  =========================================================================
opset              default-domain opset outside 9–20 (opset 23's ``Attention`` etc. are unread)
domain             a node of a custom domain that is not a model-local function (needs a plugin)
unsupported-op     ops the parser has no importer for (:data:`UNSUPPORTED_OPS`: ``Unique``,
                   ``Compress``, sequence / optional / string ops, training ops, ...)
data-dependent     ``NonZero``: its output size depends on the data. TensorRT can run it, but
                   vlmopt's contract is static shapes (pruning is fixed-k ``TopK`` + ``Gather``)
topk-k             ``TopK`` whose K is not an initializer / ``Constant``, or K ≥ 3840
topk-sorted        ``TopK`` with ``sorted=0`` (TensorRT always sorts; unsorted output is not read)
static-input       inputs that must be initializers / ``Constant`` outputs: ``axes`` of
                   Reduce*/Squeeze/Unsqueeze/Slice, ``pads`` of Pad, ``split`` of Split,
                   ``depth`` of OneHot, ``axis`` of CumSum (:data:`STATIC_INPUTS`)
loop               ``Loop`` whose trip count is not a constant and that has scan outputs
                   (their length would be data dependent)
dtype              tensors of a type TensorRT has no format for (string, complex, float64
                   graph inputs/outputs, uint16/32/64)
=================  =========================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmopt.errors import MissingDependencyError

OPSET_RANGE = (9, 20)
"""Default-domain opsets TensorRT 10's ONNX parser reads."""
TOPK_MAX_K = 3840
"""TopK's K must be below this in TensorRT."""

UNSUPPORTED_OPS: dict[str, str] = {
    "Unique": "no importer in TensorRT's ONNX parser (data-dependent output size)",
    "Compress": "no importer in TensorRT's ONNX parser (data-dependent output size)",
    **{op: "sequence types are not supported by TensorRT" for op in (
        "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
        "SequenceLength", "SequenceMap", "SplitToSequence", "ConcatFromSequence",
    )},
    **{op: "optional types are not supported by TensorRT" for op in ("Optional", "OptionalGetElement", "OptionalHasElement")},
    **{op: "string tensors are not supported by TensorRT" for op in (
        "StringNormalizer", "StringConcat", "StringSplit", "RegexFullMatch", "TfIdfVectorizer",
    )},
    **{op: "training-only op, not supported by TensorRT" for op in (
        "Gradient", "Momentum", "Adagrad", "Adam", "SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss",
    )},
    **{op: "integer-arithmetic op without a TensorRT importer (use QuantizeLinear/DequantizeLinear)" for op in (
        "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear",
    )},
    **{op: "signal-processing op without a TensorRT importer" for op in ("STFT", "MelWeightMatrix", "DFT")},
    "Multinomial": "sampling op without a TensorRT importer",
    "ImageDecoder": "no importer in TensorRT's ONNX parser",
    "Attention": "opset-23 op; TensorRT 10's parser reads opsets 9–20 (export at opset ≤ 20)",
    "RotaryEmbedding": "opset-23 op; TensorRT 10's parser reads opsets 9–20",
    "RMSNormalization": "opset-23 op; TensorRT 10's parser reads opsets 9–20",
}
"""Ops TensorRT 10's ONNX parser rejects, with the reason."""

DATA_DEPENDENT_OPS = {"NonZero": "output size depends on the data; prune with fixed-k TopK + Gather instead"}

STATIC_INPUTS: dict[str, dict[int, str]] = {
    **{op: {1: "axes"} for op in (
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "Squeeze", "Unsqueeze",
    )},
    "Slice": {3: "axes"},
    "Pad": {1: "pads", 3: "axes"},
    "Split": {1: "split"},
    "OneHot": {1: "depth"},
    "CumSum": {1: "axis"},
    "TopK": {1: "K"},
}
"""Op → {input index: name} of inputs that must be initializers or Constant outputs."""

BAD_TYPES = {"STRING": "string", "COMPLEX64": "complex", "COMPLEX128": "complex", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64"}


@dataclass
class Issue:
    """One node TensorRT's parser would reject (or that breaks vlmopt's static-shape contract)."""

    node: str
    """Node name (``OpType#index`` when the node has none); ``<model>`` for model-level rules."""
    op_type: str
    rule: str
    """Key of the rule table in this module's docstring."""
    message: str
    severity: str = "error"
    """``error`` (the graph is not TensorRT-ready) or ``warning``."""
    where: str = "graph"
    """``graph``, or the subgraph / function path the node sits in."""

    def __str__(self) -> str:
        place = "" if self.where == "graph" else f" (in {self.where})"
        return f"{self.severity}: {self.node} [{self.op_type}]{place}: {self.rule}: {self.message}"


@dataclass
class TRTReport:
    """The result of :func:`check_tensorrt` for one ONNX file."""

    path: str
    opset: int | None
    nodes: int
    """Nodes checked (subgraphs and functions included)."""
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def ok(self) -> bool:
        """True when TensorRT's parser would accept every node (warnings allowed)."""
        return not self.errors

    def format(self) -> str:
        head = f"{self.path}: opset {self.opset}, {self.nodes} nodes: " + (
            "TensorRT-ready" if self.ok else f"NOT TensorRT-ready ({len(self.errors)} node(s) rejected)"
        )
        return "\n".join([head, *(f"  {issue}" for issue in self.issues)])


def check_tensorrt(model: Any) -> TRTReport:
    """Check an ONNX model (a path or an ``onnx.ModelProto``) against TensorRT's parser rules."""
    try:
        import onnx
    except ImportError as error:
        raise MissingDependencyError(f"the TensorRT check reads ONNX with onnx ({error}); pip install 'vlmopt[onnx]'") from error
    path = str(model) if isinstance(model, (str, Path)) else "<model>"
    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    report = TRTReport(path, opset, 0)
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        report.issues.append(Issue("<model>", "-", "opset", f"default-domain opset {opset} is outside {OPSET_RANGE[0]}–{OPSET_RANGE[1]}; re-export with --opset 18"))
    types = _value_types(model)
    for name, kind in _graph_io_types(model.graph):
        if kind in BAD_TYPES or kind == "DOUBLE":
            reason = BAD_TYPES.get(kind, "float64")
            report.issues.append(Issue(name, "<io>", "dtype", f"graph input/output of type {reason} has no TensorRT format"))
    functions = {(f.domain, f.name): f for f in model.functions}
    constants = {init.name for init in model.graph.initializer}
    values = _constant_values(model)
    for where, index, node, scope_constants in _walk(model.graph, "graph", constants, functions):
        report.nodes += 1
        report.issues.extend(_check_node(node, index, where, scope_constants, functions, types, values))
    return report


def _constant_values(model) -> dict[str, Any]:
    """Values of the top-level initializers and of every Constant node (names are unique in ONNX)."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer if not init.external_data}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _graph_io_types(graph) -> Iterator[tuple[str, str]]:
    import onnx

    for value in [*graph.input, *graph.output]:
        elem = value.type.tensor_type.elem_type
        if elem:
            yield value.name, onnx.TensorProto.DataType.Name(elem)


def _value_types(model) -> dict[str, str]:
    """Element type name of every value shape inference can type (empty if inference fails)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a broken model is reported node by node below
        return {}
    found = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        elem = value.type.tensor_type.elem_type
        if elem:
            found[value.name] = onnx.TensorProto.DataType.Name(elem)
    return found


def _walk(graph, where: str, constants: set[str], functions: dict, seen: frozenset = frozenset()) -> Iterable:
    """(where, index, node, constants in scope) for every node, entering subgraphs and local functions."""
    import onnx

    scope = set(constants) | {init.name for init in graph.initializer}
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            scope.update(node.output)
        if node.op_type == "Identity" and node.input and node.input[0] in scope:
            scope.update(node.output)
        yield where, index, node, frozenset(scope)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attribute.g, f"{where}/{_name(node, index)}.{attribute.name}", scope, functions, seen)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for k, sub in enumerate(attribute.graphs):
                    yield from _walk(sub, f"{where}/{_name(node, index)}.{attribute.name}[{k}]", scope, functions, seen)
        key = (node.domain, node.op_type)
        if key in functions and key not in seen:
            function = functions[key]
            yield from _walk(_FunctionGraph(function), f"function {node.domain}::{node.op_type}", set(), functions, seen | {key})


class _FunctionGraph:
    """A FunctionProto seen as a graph (nodes, no initializers) for :func:`_walk`."""

    def __init__(self, function) -> None:
        self.node = function.node
        self.initializer = ()


def _name(node, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _check_node(node, index: int, where: str, constants: frozenset, functions: dict, types: dict, values: dict) -> list[Issue]:
    import onnx

    name, op = _name(node, index), node.op_type
    issues: list[Issue] = []

    def issue(rule: str, message: str, severity: str = "error") -> None:
        issues.append(Issue(name, op, rule, message, severity, where))

    if node.domain not in ("", "ai.onnx"):
        if (node.domain, op) not in functions:
            issue("domain", f"custom op {node.domain}::{op} has no TensorRT importer; it would need a plugin")
        return issues
    if op in UNSUPPORTED_OPS:
        issue("unsupported-op", UNSUPPORTED_OPS[op])
    if op in DATA_DEPENDENT_OPS:
        issue("data-dependent", DATA_DEPENDENT_OPS[op])
    for position, role in STATIC_INPUTS.get(op, {}).items():
        if position < len(node.input) and node.input[position] and node.input[position] not in constants:
            issue("static-input" if op != "TopK" else "topk-k", f"input {position} ({role}) '{node.input[position]}' must be an initializer or Constant")
    if op == "TopK":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("sorted", 1) != 1:
            issue("topk-sorted", "sorted=0 is not supported; use sorted=1")
        k = values.get(node.input[1]) if len(node.input) > 1 else None
        if k is not None and k.size == 1 and int(k.reshape(-1)[0]) >= TOPK_MAX_K:
            k = int(k.reshape(-1)[0])
            issue("topk-k", f"K={k} is not below TensorRT's limit of {TOPK_MAX_K}")
    if op == "Loop":
        trip = node.input[0] if node.input else ""
        body = next((a.g for a in node.attribute if a.name == "body"), None)
        scan_outputs = len(body.output) - 1 - (len(node.input) - 2) if body is not None else 0
        if scan_outputs > 0 and trip not in constants:
            issue("loop", f"{scan_outputs} scan output(s) with a trip count that is not a constant: their length is data dependent")
    for output in node.output:
        kind = types.get(output)
        if kind in BAD_TYPES:
            issue("dtype", f"output '{output}' is {BAD_TYPES[kind]}, which TensorRT has no format for")
    return issues

