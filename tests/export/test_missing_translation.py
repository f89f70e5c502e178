"""An op whose file sets ``onnx_translation = None`` stops only the exports of graphs that hold it,
with an error naming the op and the pass that inserted it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from vlmopt.graph.edit import GraphEditor
from vlmopt.passes.base import Pass

pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'vlmopt[onnx]')")


@torch.library.custom_op("vlmopt::test_only_rescale", mutates_args=())
def rescale(x: Tensor) -> Tensor:
    return x * 0.5


@rescale.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


#: This test op follows the op-file convention, and has no ONNX form.
flop_formula = None
onnx_translation = None


@dataclass(frozen=True)
class RescaleTokens(Pass):
    """A test pass: halve the visual tokens with the test op before the projector."""

    def apply(self, graph) -> None:
        editor = GraphEditor(graph["prefill"])
        tokens = editor.last("visual_tokens")
        halved = editor.insert(tokens, torch.ops.vlmopt.test_only_rescale.default, (tokens,), role="visual_tokens", stage="vision")
        editor.replace_uses(tokens, halved, after=halved)
        editor.finish()


def test_export_names_the_op_and_the_pass(small_llava, tmp_path):
    import vlmopt
    from vlmopt.export import export_onnx
    from vlmopt.export.errors import ExportError

    compiled = vlmopt.compile(small_llava, passes=[RescaleTokens()])
    inserted = [n for n in compiled.graph.prefill.graph.nodes if n.target is torch.ops.vlmopt.test_only_rescale.default]
    assert [n.meta["pass"] for n in inserted] == ["RescaleTokens"]
    with pytest.raises(ExportError, match=r"vlmopt::test_only_rescale \(inserted by RescaleTokens\), which has no ONNX translation"):
        export_onnx(compiled, tmp_path)
