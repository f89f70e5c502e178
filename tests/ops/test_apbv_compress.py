"""vlmopt::apbv_compress: pooled scores and top-k against a naive loop (mean of per-token dot products,
windowed max, sort by score then index); ties; errors; opcheck; FLOPs; the ONNX translation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmopt.errors import InputError
from vlmopt.ops.apbv_compress import apbv_compress, pooled_scores


def naive(q_query, k_block, keep, pool):
    """Loops, float64, as the official code orders the work: per KV head, the mean over the group's
    query heads and the question tokens of the raw dot products; then a clipped window max; then the
    ``keep`` best (ties to the lower index), ascending."""
    batch, heads, query_len, _ = q_query.shape
    kv_heads, block_len = k_block.shape[1], k_block.shape[2]
    group = heads // kv_heads
    q, k = q_query.double(), k_block.double()
    pooled = torch.zeros(batch, kv_heads, block_len, dtype=torch.float64)
    chosen = torch.zeros(batch, kv_heads, keep, dtype=torch.long)
    for b in range(batch):
        for g in range(kv_heads):
            raw = []
            for j in range(block_len):
                dots = [float(q[b, h, t] @ k[b, g, j]) for h in range(g * group, (g + 1) * group) for t in range(query_len)]
                raw.append(sum(dots) / len(dots))
            for j in range(block_len):
                window = raw[max(0, j - pool // 2) : j + pool // 2 + 1]
                pooled[b, g, j] = max(window)
            order = sorted(range(block_len), key=lambda j: (-float(pooled[b, g, j]), j))
            chosen[b, g] = torch.tensor(sorted(order[:keep]), dtype=torch.long)
    return pooled, chosen


def random_inputs(seed, batch, heads, kv_heads, query_len, block_len, dim, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, query_len, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, block_len, dim, generator=g).to(dtype)
    return q, k


@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("pool", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_the_naive_loop(heads, pool, dtype):
    q, k = random_inputs(heads[0] * 10 + pool, 2, *heads, 3, 23, 16, dtype)
    for keep in (0, 1, 7, 23):
        want_scores, want = naive(q, k, keep, pool)
        torch.testing.assert_close(pooled_scores(q, k, pool).double(), want_scores, rtol=1e-5, atol=1e-5)
        got = apbv_compress(q, k, keep, pool)
        assert got.dtype == torch.long and got.shape == (2, heads[1], keep)
        assert torch.equal(got, want)
        assert torch.all(got[..., 1:] > got[..., :-1]), "ascending and unique"


def test_ties_go_to_the_lower_index():
    q, k = random_inputs(3, 1, 2, 1, 2, 12, 8)
    k[0, 0, 6:] = k[0, 0, :6]  # the second half repeats the first: every score ties with one 6 later
    for keep in (1, 2, 5, 6):
        got = apbv_compress(q, k, keep, 1)[0, 0].tolist()
        # both copies of a value or, where keep cuts between two copies, the lower one only
        assert all(j - 6 in got for j in got if j >= 6), got
        assert sum(j < 6 for j in got) == (keep + 1) // 2, got
        assert got == naive(q, k, keep, 1)[1][0, 0].tolist()


def test_bad_inputs_are_refused_with_the_fix():
    q, k = random_inputs(0, 1, 4, 2, 3, 10, 8)
    cases = [
        ((q, k, 3, 4), "odd"),
        ((q, k, 11, 5), "keep=11"),
        ((q, k[:, :1].expand(1, 3, -1, -1), 3, 5), "multiple of"),
        ((q[:, :, :0], k, 3, 5), "question block is empty"),
        ((q, k[..., :4], 3, 5), "head dim"),
    ]
    for args, message in cases:
        with pytest.raises(InputError, match=message):
            apbv_compress(*args)


def test_opcheck_and_flops():
    q, k = random_inputs(1, 2, 4, 2, 3, 17, 8)
    torch.library.opcheck(torch.ops.vlmopt.apbv_compress.default, (q, k, 6, 5))

    from torch.utils.flop_counter import FlopCounterMode

    from vlmopt.flops import register_flop_formulas

    register_flop_formulas()  # the formula comes from the op file, as vlmopt.flops finds it
    counter = FlopCounterMode(display=False)
    with counter:
        apbv_compress(q, k, 6, 5)
    assert counter.get_total_flops() == q.numel() + 2 * k.numel()


def test_onnx_translation_matches_the_op(tmp_path):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'vlmopt[onnx]')")
    pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'vlmopt[onnx]')")
    from vlmopt.export.onnx import ort_session
    from vlmopt.export.onnx_ops import translation_table
    from vlmopt.export.trt_check import check_tensorrt

    class Compress(torch.nn.Module):
        def forward(self, q, k):
            return torch.ops.vlmopt.apbv_compress(q, k, 6, 5), torch.ops.vlmopt.apbv_compress(q, k, 17, 1)

    path = tmp_path / "apbv_compress.onnx"
    torch.onnx.export(Compress().eval(), random_inputs(0, 2, 4, 2, 3, 17, 8), dynamo=True, custom_translation_table=translation_table(Compress(), random_inputs(0, 2, 4, 2, 3, 17, 8), "compress"), opset_version=18).save(path)
    assert check_tensorrt(path).ok, check_tensorrt(path).format()
    session = ort_session(path)
    for seed in (1, 2):
        args = random_inputs(seed, 2, 4, 2, 3, 17, 8)
        got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
        for want, have in zip(Compress()(*args), got):
            np.testing.assert_array_equal(have, want.numpy())
