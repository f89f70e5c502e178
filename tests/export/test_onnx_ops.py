"""Every vlmopt:: op has an ONNX translation, and onnxruntime runs it like the op on fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'vlmopt[onnx]')")
pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'vlmopt[onnx]')")

ops = torch.ops.vlmopt
GRIDS, OUT_GRIDS = [1, 4, 3, 1, 4, 5], [2, 2, 3, 2]


class EveryOp(nn.Module):
    """One call of each op, with two visual inputs of different sizes where the op takes counts."""

    def forward(self, x, index, embeds, features, slots, scores, visual, kept, q, k, obj, deep, tokens,
                states, candidates, anchors, q_last, keys, key_mask):
        return (
            ops.gather_sequence(x, index, 1, 2),  # M-RoPE ids [3, B, S]
            ops.gather_sequence(embeds, index, 0, 1),
            ops.merge_visual(embeds, features, slots),
            ops.topk_indices(scores, [12, 20], [5, 7]),
            ops.random_scores(scores, [12, 20], 3),
            *ops.pool_tokens(tokens, GRIDS, OUT_GRIDS),
            ops.sequence_keep_index(visual, kept, 2, 10, 8),
            ops.received_attention(q, k, 2, 0.5),
            *ops.hiprune_select(obj, deep, GRIDS, [6, 9], [1, 2]),
            ops.kcenter_select(states, candidates, anchors, 3),  # HalfV's coverage picks (unrolled)
            ops.last_token_attention(q_last, keys, key_mask, 1.0),  # HalfV's relevance probe
            ops.gather_sequence(key_mask, index, 0, 1),  # a bool [B, S] mask (HalfV's visual span)
        )


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(3, 2, 10, generator=g),
        torch.tensor([[-1, 0, 2, 5, 9], [1, 3, 4, 6, 8]]),
        torch.randn(2, 10, 6, generator=g),
        torch.randn(4, 6, generator=g),
        torch.randperm(20, generator=g)[:4],
        torch.rand(32, generator=g),
        torch.tensor([2, 3, 4, 5, 13, 14, 15, 16]),
        torch.tensor([3, 5, 13, 16]),
        torch.randn(2, 7, 8, generator=g),
        torch.randn(2, 7, 8, generator=g),
        torch.rand(32, generator=g),
        torch.rand(32, generator=g),
        torch.randn(32, 6, generator=g),
        torch.randn(2, 9, 6, generator=g),
        torch.rand(2, 9, generator=g) > 0.2,
        torch.zeros(2, 9, dtype=torch.bool).index_fill(1, torch.randperm(9, generator=g)[:2], True) & torch.tensor([[True], [False]]),
        torch.randn(2, 4, 8, generator=g),
        torch.randn(2, 2, 10, 8, generator=g),
        torch.rand(2, 10, generator=g) > 0.4,
    )


def test_the_table_holds_the_ops_the_module_runs():
    from vlmopt.export.onnx_ops import ops_in, translation_table
    from vlmopt.ops import op_modules

    translated = {name for name, module in op_modules().items() if module.onnx_translation is not None}
    assert translated >= {"merge_visual", "gather_sequence", "topk_indices", "hiprune_select", "kcenter_select", "last_token_attention"}
    table = translation_table(EveryOp(), inputs(0), "ops")
    ran = {name.split("::")[1] for name in ops_in(EveryOp(), inputs(0))}
    assert ran <= translated
    assert {getattr(ops, name).default for name in ran} == set(table)
    merge_only = translation_table(_MergeOnly(), inputs(0)[2:5], "merge")
    assert set(merge_only) == {ops.merge_visual.default}


class _MergeOnly(nn.Module):
    def forward(self, embeds, features, slots):
        return ops.merge_visual(embeds, features, slots)


def test_translations_match_the_ops(tmp_path):
    from vlmopt.export.onnx import ort_session
    from vlmopt.export.onnx_ops import translation_table
    from vlmopt.export.trt_check import check_tensorrt

    path = tmp_path / "ops.onnx"
    torch.onnx.export(EveryOp().eval(), inputs(0), dynamo=True, custom_translation_table=translation_table(EveryOp(), inputs(0), "ops"), opset_version=18).save(path)
    session = ort_session(path)
    assert check_tensorrt(path).ok, check_tensorrt(path).format()
    for seed in (1, 2):  # fresh inputs, not the ones the export was traced with
        args = inputs(seed)
        expected = EveryOp()(*args)
        got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
        for want, have in zip(expected, got):
            if want.dtype.is_floating_point:
                np.testing.assert_allclose(have, want.numpy(), atol=1e-6, rtol=1e-5)
            else:
                np.testing.assert_array_equal(have, want.numpy())
