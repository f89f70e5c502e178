"""vlmopt::lse_merge: attention over a key set split into disjoint parts, merged, equals attention over
the whole set; empty parts contribute nothing; FLOPs, opcheck and the ONNX translation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmopt.errors import InputError
from vlmopt.ops.apbv_attention import apbv_attention
from vlmopt.ops.lse_merge import lse_merge


def attend(q, k, v, visible):
    """float64 attention of q over the keys where ``visible`` [Sq, Sk] is True: (out, lse)."""
    logits = (q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    probs = torch.where(visible, torch.exp(logits - lse[..., None]), 0.0)  # rows with no key: 0, not NaN
    return probs @ v.double(), lse


def random_parts(seed, parts, batch=2, heads=3, queries=9, keys=23, dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, dim, generator=g)
    k = torch.randn(batch, heads, keys, dim, generator=g) * 2
    v = torch.randn(batch, heads, keys, dim, generator=g)
    owner = torch.randint(0, parts, (keys,), generator=g)  # each key belongs to exactly one part
    return q, k, v, owner


@pytest.mark.parametrize("parts", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merging_split_attention_gives_attention_over_all_keys(parts, dtype):
    q, k, v, owner = random_parts(parts, parts)
    outs, lses = zip(*(attend(q, k, v, (owner == p)[None, :].expand(q.shape[2], -1)) for p in range(parts)))
    out, lse = lse_merge(torch.stack(outs).to(dtype), torch.stack(lses).float())
    want_out, want_lse = attend(q, k, v, torch.ones(q.shape[2], k.shape[2], dtype=torch.bool))
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), want_out, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_empty_parts_contribute_nothing_and_empty_rows_stay_empty():
    q, k, v, owner = random_parts(11, 3)
    visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    visible[4] = False  # query row 4 sees no key in any part
    outs, lses = [], []
    for p in range(3):
        out, lse = attend(q, k, v, visible & (owner == p)[None, :])
        outs.append(out)
        lses.append(lse)
    outs.append(torch.full_like(outs[0], float("nan")))  # a part with no key at all, holding garbage
    lses.append(torch.full_like(lses[0], float("-inf")))
    out, lse = lse_merge(torch.stack(outs).float(), torch.stack(lses).float())
    want_out, want_lse = attend(q, k, v, visible)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(lse[:, :, 4], torch.full_like(lse[:, :, 4], float("-inf")))
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_apbv_question_block_merged_across_hosts_is_exact():
    """APB-V's question block: each host attends its share of the context ([anchor slice | its
    blocks]), host 0 also the question itself causally; merged, that is causal attention of the
    question over the whole sequence."""
    context, question, hosts, dim = 29, 6, 3, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, question, dim, generator=g)
    k = torch.randn(1, 2, context + question, dim, generator=g)
    v = torch.randn(1, 2, context + question, dim, generator=g)
    bounds = torch.linspace(0, context, hosts + 1).long().tolist()
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for h in range(hosts):
        share = list(range(bounds[h], bounds[h + 1]))
        if h == 0:  # [share as passing | question as the block]: the question sees itself causally
            keys = share + list(range(context, context + question))
            out, lse = apbv_attention(q, k[:, :, keys], v[:, :, keys], 0, len(share), dim**-0.5)
        else:  # every key of the share is visible: no mask
            logits = q @ k[:, :, share].repeat_interleave(group, 1).transpose(-1, -2) * dim**-0.5
            lse = torch.logsumexp(logits, -1)
            out = torch.softmax(logits, -1) @ v[:, :, share].repeat_interleave(group, 1)
        outs.append(out)
        lses.append(lse)
    out, lse = lse_merge(torch.stack(outs), torch.stack(lses))
    # the question row i sees the whole context and question tokens 0..i (bottom-right causal)
    visible = torch.arange(context + question)[None, :] <= context + torch.arange(question)[:, None]
    want, want_lse = attend(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), visible)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_bad_inputs_opcheck_and_flops():
    outs, lses = torch.randn(3, 2, 4, 5, 8), torch.randn(3, 2, 4, 5)
    for bad_outs, bad_lses in ((outs, lses[:, :, :, :4]), (outs[0], lses[0]), (outs[:0], lses[:0])):
        with pytest.raises(InputError, match=r"\[P, B, H, S, D\]"):
            lse_merge(bad_outs, bad_lses)
    lses[1, 0, 2] = float("-inf")
    torch.library.opcheck(torch.ops.vlmopt.lse_merge.default, (outs, lses))

    from torch.utils.flop_counter import FlopCounterMode

    from vlmopt.flops import register_flop_formulas

    register_flop_formulas()  # the formula comes from the op file, as vlmopt.flops finds it
    counter = FlopCounterMode(display=False)
    with counter:
        lse_merge(outs, lses)
    assert counter.get_total_flops() == 2 * outs.numel()


def test_onnx_translation_matches_the_op(tmp_path):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'vlmopt[onnx]')")
    pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'vlmopt[onnx]')")
    from vlmopt.export.onnx import ort_session
    from vlmopt.export.onnx_ops import translation_table
    from vlmopt.export.trt_check import check_tensorrt

    class Merge(torch.nn.Module):
        def forward(self, outs, lses):
            return torch.ops.vlmopt.lse_merge(outs, lses)

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        lses = torch.randn(3, 2, 4, 9, generator=g) * 3
        lses[1, 0, 1] = float("-inf")  # one empty part
        lses[:, 1, 2, 3] = float("-inf")  # one row that no part sees
        return torch.randn(3, 2, 4, 9, 8, generator=g), lses

    path = tmp_path / "lse_merge.onnx"
    torch.onnx.export(Merge().eval(), inputs(0), dynamo=True, custom_translation_table=translation_table(Merge(), inputs(0), "merge"), opset_version=18).save(path)
    assert check_tensorrt(path).ok, check_tensorrt(path).format()
    session = ort_session(path)
    for seed in (1, 2):
        args = inputs(seed)
        got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
        for want, have in zip(Merge()(*args), got):
            np.testing.assert_allclose(have, want.numpy(), rtol=1e-5, atol=1e-6)
