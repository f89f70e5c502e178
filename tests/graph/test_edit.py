"""GraphEditor reads and rewires arguments by parameter name, however the call passed them."""

import operator

import pytest
import torch
from torch import fx, nn

import vlmopt
from vlmopt.graph.edit import GraphEditor, inserting_for


def scale_by(x, factor, offset=0.0):
    return x * factor + offset


fx.wrap("scale_by")  # one call_function node, as the pipeline's graph functions are


class Calls(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, y, positions):
        merged = torch.ops.vlmopt.merge_visual(x, y, positions=positions)
        scaled = scale_by(merged, 2.0, offset=1.0)
        return self.linear(input=scaled)


@pytest.fixture
def editor():
    module = fx.symbolic_trace(Calls())
    return GraphEditor(module)


def test_input_of_reads_positional_and_keyword_arguments(editor):
    merge = next(n for n in editor.graph.nodes if "merge_visual" in str(n.target))
    assert editor.input_of(merge, "embeds").name == "x" and editor.input_of(merge, "positions").name == "positions"
    scale = next(n for n in editor.graph.nodes if n.target is scale_by)
    assert editor.input_of(scale, "factor") == 2.0 and editor.input_of(scale, "offset") == 1.0
    linear = next(n for n in editor.graph.nodes if n.op == "call_module")
    assert editor.input_of(linear, "input") is scale
    with pytest.raises(LookupError, match="no parameter 'scale'"):
        editor.input_of(scale, "scale")


def test_set_input_rewires_where_the_call_passed_it(editor):
    merge = next(n for n in editor.graph.nodes if "merge_visual" in str(n.target))
    x, y = editor.placeholder("x"), editor.placeholder("y")
    editor.set_input(merge, "positions", x)  # passed as keyword
    editor.set_input(merge, "features", x)  # passed positionally
    assert merge.kwargs["positions"] is x and merge.args[1] is x and y not in merge.args
    scale = next(n for n in editor.graph.nodes if n.target is scale_by)
    editor.set_input(scale, "factor", 3.0)
    assert scale.args == (merge, 3.0)


def test_inserted_nodes_carry_the_pass(llava_clip):
    compiled = vlmopt.compile(llava_clip, passes=["random_prune:keep_ratio=0.5"])
    base = {n.name for n in vlmopt.compile(llava_clip).graph.prefill.graph.nodes}
    added = [n for n in compiled.graph.prefill.graph.nodes if n.name not in base]
    assert added and all(n.meta.get("pass") == "RandomPrune" for n in added)
    module = fx.symbolic_trace(Calls())
    editor = GraphEditor(module)
    with inserting_for("Mine"):
        node = editor.insert(editor.placeholder("x"), operator.neg, (editor.placeholder("x"),), role="test", stage="llm")
    outside = editor.insert(node, operator.neg, (node,), role="test", stage="llm")
    assert node.meta["pass"] == "Mine" and "pass" not in outside.meta


def test_inserter_passes_keywords_to_the_target_and_meta_to_the_node():
    """``chain(torch.sum, x, dim=1, ...)`` sums over dim 1: keywords reach the call, ``meta=`` the node."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(x)
    editor = GraphEditor(fx.GraphModule(nn.Module(), graph))
    summed = editor.chain(x)(torch.sum, x, dim=1, role="score", stage="llm", name="row_sums", meta={"seq_dim": (0, 1)})
    editor.output().args = (summed,)
    editor.finish()
    assert summed.kwargs == {"dim": 1} and summed.meta["seq_dim"] == (0, 1) and "dim" not in summed.meta
    value = torch.randn(3, 5, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(editor.module(value), value.sum(1))
