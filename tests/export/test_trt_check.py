"""The TensorRT compatibility check: our exports pass; hand-made graphs with rejected nodes are flagged by name."""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx", reason="the check reads ONNX with onnx (pip install 'vlmopt[onnx]')")
from onnx import TensorProto, helper

from vlmopt.export.trt_check import check_tensorrt


def test_flags_every_rejected_node_by_name(unsupported_model):
    report = check_tensorrt(unsupported_model())
    assert not report.ok
    flagged = {(issue.node, issue.rule) for issue in report.errors}
    assert flagged == {
        ("find_kept", "data-dependent"),
        ("compress_tokens", "unsupported-op"),
        ("dynamic_topk", "topk-k"),
        ("dynamic_topk", "topk-sorted"),
        ("huge_topk", "topk-k"),
        ("runtime_axes", "static-input"),
        ("unique_inside_if", "unsupported-op"),
        ("custom_pruner", "domain"),
    }
    text = report.format()
    assert "NOT TensorRT-ready" in text and "find_kept [NonZero]" in text and "branchy.then_branch" in text


def test_flags_an_opset_tensorrt_does_not_read():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    report = check_tensorrt(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    assert [(i.node, i.rule) for i in report.errors] == [("<model>", "opset")]


@pytest.mark.parametrize("name", ["llava", "llava+random_prune", "qwen", "qwen_proc+pool_prune", "llava_proc+hiprune"])
def test_our_exports_are_tensorrt_ready(exported, name):
    from vlmopt.export.manifest import GRAPHS, read_manifest

    export = exported(name)
    manifest = read_manifest(export.out)
    for graph in GRAPHS:
        report = check_tensorrt(export.out / manifest["graphs"][graph]["file"])
        assert report.ok, report.format()
        assert report.nodes > 10
    if manifest["passes"] and manifest["passes"][0].startswith(("random_prune", "hiprune")):
        types = {n.op_type for n in onnx.load(str(export.out / "vision.onnx")).graph.node}
        assert "TopK" in types and "NonZero" not in types  # pruning is fixed-k TopK + Gather
