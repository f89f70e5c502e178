"""HalfV's in-LLM cut bound to one image per row (vlmopt.export.fixed_rows): the same slots as the
pipeline's layout-reading functions, in PyTorch and in onnxruntime at shapes the export never saw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import fx, nn

from vlmopt.export.fixed_rows import bind_visual_rows
from vlmopt.graph import functions as gf
from vlmopt.graph.functions import compact_slots
from vlmopt.graph.layout import VisualLayout
from vlmopt.passes.halfv_cut import EXPORT_BINDINGS, halfv_active_rows, halfv_keep, row_budgets

PER_ROW = 10
"""Visual tokens an image brings to the LLM in these tests."""
ROW = VisualLayout(1, PER_ROW, (0,), (PER_ROW,), None)
"""One image of ``PER_ROW`` tokens, as it reaches the LLM."""

#: (current, keep, anchor_frac, with states): the first cut (anchors + k-center), the second (relevance only).
CUTS = [(1.0, 0.5, 0.4, True), (1.0, 0.3, 0.0, True), (0.5, 0.2, 1.0, False)]


def pipeline_graph(current: float, keep: float, anchor_frac: float, with_states: bool) -> fx.GraphModule:
    """relevance, states, span, layout → (halfv_keep, halfv_active_rows), as HalfV inserts them."""
    graph = fx.Graph()
    relevance, states, span, layout = (graph.placeholder(name) for name in ("relevance", "states", "span", "layout"))
    kept = graph.call_function(halfv_keep, (relevance, states if with_states else None, span, layout, current, keep, anchor_frac))
    active = graph.call_function(halfv_active_rows, (span, layout, current))
    graph.output((kept, active))
    return fx.GraphModule(nn.Module(), graph)


def prompt(seed: int, batch: int, seq: int, visual: int):
    """Fresh left-padded rows, each with one run of ``visual`` visual tokens at a random place."""
    g = torch.Generator().manual_seed(seed)
    span = torch.zeros(batch, seq, dtype=torch.bool)
    for row in range(batch):
        pad = int(torch.randint(0, 4, (1,), generator=g))
        start = pad + int(torch.randint(0, seq - pad - visual + 1, (1,), generator=g))
        span[row, start : start + visual] = True
    layout = VisualLayout(batch, seq, tuple(range(batch)), (PER_ROW,) * batch, None)
    return torch.rand(batch, seq, generator=g), torch.randn(batch, seq, 12, generator=g), span, layout


@pytest.mark.parametrize("cut", CUTS)
def test_bound_cut_gives_the_pipeline_slots(cut):
    current = cut[0]
    visual = PER_ROW if current == 1.0 else row_budgets(VisualLayout(1, 1, (0,), (PER_ROW,), None), current)[0]
    module = pipeline_graph(*cut)
    batches = [prompt(seed, 3, 24, visual) for seed in (1, 2, 3)]
    expected = [module(*inputs) for inputs in batches]
    assert bind_visual_rows(module, ROW, EXPORT_BINDINGS) == ["halfv_keep", "halfv_active_rows"]
    assert [n.target for n in module.graph.nodes if n.op == "placeholder"] == ["relevance", "states", "span"]
    for inputs, (kept, active) in zip(batches, expected):
        got_kept, got_active = module(*inputs[:3])
        assert torch.equal(got_kept, kept) and torch.equal(got_active, active)
        assert (kept >= 0).all()  # every row holds the same count, so no row is padded


@pytest.mark.parametrize("cut", CUTS[:2])
def test_bound_cut_counts_a_tiled_row_per_input_without_its_structural_tokens(cut):
    """A row whose image reaches the LLM as three inputs (a base grid; two tiles, each ending its row with a
    newline): the bound cut keeps per input, as the pipeline does, and never counts the newlines (which stay
    outside the visual span)."""
    row = VisualLayout.from_grids(1, 40, (0, 0, 0), ((1, 3, 3), (1, 1, 3), (1, 1, 1)), structural=((), (3,), (1,)))
    per_input = sum(row_budgets(VisualLayout(1, 1, (0,), (c,), None), cut[1])[0] for c in row.grid_counts)
    assert per_input != row_budgets(VisualLayout(1, 1, (0,), (sum(row.grid_counts),), None), cut[1])[0]
    module = pipeline_graph(*cut)
    g = torch.Generator().manual_seed(7)
    batches = []
    for seed in (1, 2):
        relevance, states, span, _ = prompt(seed, 3, 30, sum(row.grid_counts))
        layout = VisualLayout.from_grids(3, 30, (0, 0, 0, 1, 1, 1, 2, 2, 2), row.grids * 3, structural=row.structural * 3)
        batches.append((relevance + torch.rand(relevance.shape, generator=g), states, span, layout))
    expected = [module(*inputs) for inputs in batches]
    bind_visual_rows(module, row, EXPORT_BINDINGS)
    for inputs, (kept, active) in zip(batches, expected):
        got_kept, got_active = module(*inputs[:3])
        assert torch.equal(got_kept, kept) and torch.equal(got_active, active)
        assert kept.shape[1] == 30 - sum(row.grid_counts) + per_input


def test_compact_slots_matches_right_aligned():
    g = torch.Generator().manual_seed(4)
    flags = torch.rand(4, 15, generator=g) > 0.5
    out_len = int(flags.sum(1).max()) + 2
    assert torch.equal(compact_slots(flags, out_len), gf.right_aligned(flags, out_len))


def test_bound_cut_in_onnxruntime_at_other_shapes(tmp_path):
    """Exported with dynamic batch and sequence, checked by TensorRT's rules, run at a batch and a
    prompt length the trace never saw."""
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'vlmopt[onnx]')")
    pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'vlmopt[onnx]')")
    from torch.export import Dim

    from vlmopt.export.onnx import ort_session
    from vlmopt.export.onnx_ops import translation_table
    from vlmopt.export.trt_check import check_tensorrt

    module = pipeline_graph(*CUTS[0]).eval()
    reference = [module(*prompt(seed, b, s, PER_ROW)) for seed, b, s in ((5, 4, 31), (6, 1, 17))]
    bind_visual_rows(module, ROW, EXPORT_BINDINGS)
    example = prompt(0, 2, 24, PER_ROW)[:3]
    batch, seq = Dim("batch", min=1, max=8), Dim("sequence", min=PER_ROW + 4, max=64)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq})
    path = tmp_path / "cut.onnx"
    torch.onnx.export(
        module, example, dynamo=True, dynamic_shapes=shapes, opset_version=18,
        custom_translation_table=translation_table(module, example, "cut"),
    ).save(path)
    report = check_tensorrt(path)
    assert report.ok, report.format()
    session = ort_session(path)
    for (seed, b, s), (kept, active) in zip(((5, 4, 31), (6, 1, 17)), reference):
        feeds = dict(zip(("relevance", "states", "span"), (t.numpy() for t in prompt(seed, b, s, PER_ROW)[:3])))
        got_kept, got_active = session.run(None, feeds)
        np.testing.assert_array_equal(got_kept, kept.numpy())
        np.testing.assert_array_equal(got_active, active.numpy())


def test_bound_grid_positions_leave_each_image_s_structural_tokens_out():
    """The visual span of a row without its structural tokens (``gf.grid_positions``), bound to rows of one
    tiled image each, picks the same slots as the pipeline function on the batch's layout."""
    from vlmopt.export.fixed_rows import CORE_BINDINGS

    row = VisualLayout.from_grids(1, 40, (0, 0, 0), ((1, 2, 2), (1, 1, 3), (1, 2, 1)), structural=((0,), (3,), (1, 3)))
    layout = VisualLayout.from_grids(3, 40, (0, 0, 0, 1, 1, 1, 2, 2, 2), row.grids * 3, structural=row.structural * 3)
    positions = torch.randperm(120, generator=torch.Generator().manual_seed(8))[: layout.total]
    graph = fx.Graph()
    slots, rows = graph.placeholder("positions"), graph.placeholder("layout")
    graph.output(graph.call_function(gf.grid_positions, (slots, rows)))
    module = fx.GraphModule(nn.Module(), graph)
    expected = module(positions, layout)
    assert expected.numel() == 3 * sum(row.grid_counts)
    bind_visual_rows(module, row, CORE_BINDINGS)
    assert torch.equal(module(positions), expected)
