"""vlmopt::last_token_attention (HalfV's relevance probe) against a per-batch, per-head Python loop."""

import math

import pytest
import torch

from vlmopt.errors import InputError
from vlmopt.ops.last_token_attention import last_token_attention

SHAPES = [  # batch, query heads, key heads, keys, head dim
    (2, 8, 2, 13, 16),  # GQA, 4 query heads per key head
    (3, 4, 4, 7, 8),  # MHA
    (1, 6, 3, 31, 5),  # odd sizes
    (2, 7, 1, 9, 3),  # MQA, odd head count
]


def loop_reference(q_last, k, key_mask, scale):
    """Softmax over the listed masked keys of each (row, head), in float64, averaged over heads."""
    batch, heads, _ = q_last.shape
    group = heads // k.shape[1]
    out = torch.zeros(batch, k.shape[2], dtype=torch.float64)
    for row in range(batch):
        keys = [j for j in range(k.shape[2]) if key_mask[row, j]]
        if not keys:
            continue
        for head in range(heads):
            logits = [scale * float(q_last[row, head].double() @ k[row, head // group, j].double()) for j in keys]
            top = max(logits)
            weights = [math.exp(value - top) for value in logits]
            total = sum(weights)
            for j, weight in zip(keys, weights):
                out[row, j] += weight / total / heads
    return out


def random_inputs(shape, seed, dtype=torch.float32):
    batch, heads, kv_heads, keys, dim = shape
    generator = torch.Generator().manual_seed(seed)
    q_last = torch.randn(batch, heads, dim, generator=generator) * 1.5
    k = torch.randn(batch, kv_heads, keys, dim, generator=generator) * 1.5
    key_mask = torch.rand(batch, keys, generator=generator) < 0.6  # holes anywhere
    key_mask[:, 0] = True  # at least one key per row
    return q_last.to(dtype), k.to(dtype), key_mask


def rotary(x, positions, base=100.0):
    """A 1-D rotary embedding (rotate-half convention) applied along the last dim of x [..., P, D]."""
    half = x.shape[-1] // 2
    frequencies = base ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = positions.double()[:, None] * frequencies[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()
    first, second = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-second, first], dim=-1) * sin


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("unscaled", [True, False], ids=["scale1", "inv_sqrt_d"])
def test_matches_loop_reference(shape, unscaled):
    q_last, k, key_mask = random_inputs(shape, seed=sum(shape) + unscaled)
    scale = 1.0 if unscaled else shape[-1] ** -0.5
    got = last_token_attention(q_last, k, key_mask, scale)
    assert got.dtype == torch.float32 and got.shape == key_mask.shape
    torch.testing.assert_close(got.double(), loop_reference(q_last, k, key_mask, scale), rtol=1e-5, atol=1e-7)
    assert torch.all(got[~key_mask] == 0)
    torch.testing.assert_close(got.sum(-1), torch.ones(shape[0]), rtol=1e-5, atol=1e-5)


def test_row_without_masked_keys_is_all_zeros_and_finite():
    q_last, k, key_mask = random_inputs((3, 4, 2, 10, 8), seed=5)
    key_mask[1] = False
    got = last_token_attention(q_last, k, key_mask, 1.0)
    assert torch.isfinite(got).all()
    assert torch.all(got[1] == 0)
    torch.testing.assert_close(got.double(), loop_reference(q_last, k, key_mask, 1.0), rtol=1e-5, atol=1e-7)


def test_with_rotary_applied_by_the_caller():
    """RoPE is the producer's business: rotated q/k go in, the op takes plain dot products of them."""
    batch, heads, kv_heads, keys, dim = 2, 6, 2, 15, 8
    q_last, k, key_mask = random_inputs((batch, heads, kv_heads, keys, dim), seed=11)
    query_position = torch.tensor([keys + 3])  # the last token sits after the keys
    q_rot = rotary(q_last[:, :, None, :], query_position)[:, :, 0]
    k_rot = rotary(k, torch.arange(keys))
    with_rope = last_token_attention(q_rot, k_rot, key_mask, dim**-0.5)
    torch.testing.assert_close(with_rope.double(), loop_reference(q_rot, k_rot, key_mask, dim**-0.5), rtol=1e-5, atol=1e-7)
    without_rope = last_token_attention(q_last, k, key_mask, dim**-0.5)
    assert (with_rope - without_rope).abs().max() > 1e-3  # the rotation reached the scores
    # RoPE scores depend on relative positions only: shifting every position leaves them unchanged.
    shift = 40
    shifted = last_token_attention(
        rotary(q_last[:, :, None, :], query_position + shift)[:, :, 0], rotary(k, torch.arange(keys) + shift), key_mask, dim**-0.5
    )
    torch.testing.assert_close(shifted, with_rope, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_float32_scores(dtype):
    q_last, k, key_mask = random_inputs((2, 4, 2, 12, 16), seed=3, dtype=dtype)
    got = last_token_attention(q_last, k, key_mask, 0.25)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), loop_reference(q_last, k, key_mask, 0.25), rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named():
    q_last, k, key_mask = random_inputs((2, 6, 4, 9, 8), seed=1)
    with pytest.raises(InputError, match="multiple of 4 key heads"):
        last_token_attention(q_last, k, key_mask, 1.0)
    q_last, k, key_mask = random_inputs((2, 4, 2, 9, 8), seed=1)
    with pytest.raises(InputError, match="key_mask must be bool"):
        last_token_attention(q_last, k, key_mask.float(), 1.0)
    with pytest.raises(InputError, match=r"\[B, H, D\]"):
        last_token_attention(q_last[:, None], k, key_mask, 1.0)


def test_opcheck():
    q_last, k, key_mask = random_inputs((2, 4, 2, 9, 8), seed=2)
    torch.library.opcheck(torch.ops.vlmopt.last_token_attention.default, (q_last, k, key_mask, 0.5))


def test_flop_formula_counts_the_dot_products():
    from torch.utils.flop_counter import FlopCounterMode

    from vlmopt.flops import register_flop_formulas

    register_flop_formulas()  # the formula comes from the op file, as vlmopt.flops finds it
    q_last, k, key_mask = random_inputs((3, 8, 2, 11, 16), seed=4)
    with FlopCounterMode(display=False) as counter:
        torch.ops.vlmopt.last_token_attention(q_last, k, key_mask, 1.0)
    assert counter.get_total_flops() == 2 * 3 * 8 * 11 * 16


def test_onnx_translation_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'vlmopt[onnx]')")
    pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'vlmopt[onnx]')")
    from vlmopt.export.onnx import ort_session
    from vlmopt.export.trt_check import check_tensorrt
    from vlmopt.ops.last_token_attention import onnx_translation

    class Probe(torch.nn.Module):
        def forward(self, q_last, k, key_mask):
            return torch.ops.vlmopt.last_token_attention(q_last, k, key_mask, 0.3)

    shape = (3, 6, 2, 17, 8)
    table = {torch.ops.vlmopt.last_token_attention.default: onnx_translation()}
    path = tmp_path / "probe.onnx"
    torch.onnx.export(Probe().eval(), random_inputs(shape, 0), dynamo=True, custom_translation_table=table, opset_version=18).save(path)
    assert check_tensorrt(path).ok, check_tensorrt(path).format()
    session = ort_session(path)
    for seed in (1, 2):  # fresh inputs, not the ones the export was traced with
        args = random_inputs(shape, seed)
        args[2][seed] = False  # a row without masked keys
        (got,) = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
        torch.testing.assert_close(torch.from_numpy(got), Probe()(*args), rtol=1e-5, atol=1e-6)
