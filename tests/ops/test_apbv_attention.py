"""vlmopt::apbv_attention: the reference against dense masked SDPA, passing blocks that hold every
earlier token against full causal attention, the FLOP count against the mask, the ONNX translation,
and the Triton kernel (in the interpreter, and compiled on a GPU) against the reference."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmopt.errors import InputError
from vlmopt.ops.apbv_attention import apbv_attention, reference, visible_mask, visible_pairs

LENGTHS = [(5, 7, 11), (0, 9, 13), (6, 0, 4), (1, 3, 1)]  # (anchor, passing, block)
HEADS = [(4, 2), (4, 4), (3, 1)]  # (H, Hkv): GQA, MHA, MQA


def random_inputs(seed, batch, heads, kv_heads, anchor, passing, block, dim, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    query_len, key_len = anchor + block, passing + anchor + block
    q = torch.randn(batch, heads, query_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, key_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, key_len, dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def mask_by_rules(anchor, passing, block):
    """The mask spelled out row by row from the op's contract (independent of ``visible_mask``)."""
    mask = torch.zeros(anchor + block, passing + anchor + block, dtype=torch.bool)
    for i in range(anchor):  # anchor query i: anchor keys 0..i
        mask[i, passing : passing + i + 1] = True
    for t in range(block):  # block query t: all passing, all anchor, block keys 0..t
        mask[anchor + t, : passing + anchor + t + 1] = True
    return mask


@pytest.mark.parametrize("lengths", LENGTHS + [(20, 13, 2), (3, 40, 17)])
def test_mask_and_visible_pairs_follow_the_rules(lengths):
    anchor, passing, block = lengths
    mask = mask_by_rules(anchor, passing, block)
    assert torch.equal(visible_mask(anchor + block, passing + anchor + block, anchor, passing), mask)
    assert visible_pairs(anchor, passing, block) == int(mask.sum())


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_matches_masked_sdpa(heads, lengths, dtype):
    anchor, passing, block = lengths
    q, k, v = random_inputs(sum(lengths) + heads[0] + heads[1], 2, *heads, *lengths, 16, dtype)
    scale = 0.7 / 4
    out, lse = apbv_attention(q, k, v, anchor, passing, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]

    group = heads[0] // heads[1]
    q64, k64, v64 = (x.double() for x in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    mask = mask_by_rules(*lengths)
    want = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask, scale=scale)
    logits = q64 @ k64.transpose(-1, -2) * scale
    want_lse = torch.log(torch.where(mask, torch.exp(logits), 0.0).sum(-1))
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(out.double(), want, **tolerance)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
def test_passing_blocks_holding_every_earlier_token_give_causal_attention(heads):
    """Split a sequence into [anchor | B0 | B1 | ...]; give block b the keys of B0..B(b-1) as its passing
    block. Then every row equals causal attention over the whole sequence (RoPE is baked into q/k,
    so the order of the keys does not matter)."""
    anchor, block, blocks, dim = 5, 11, 3, 16
    total = anchor + block * blocks
    q, k, v = random_inputs(7, 2, *heads, anchor, 0, total - anchor, dim)
    group = heads[0] // heads[1]
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True)
    logits = q.double() @ k.repeat_interleave(group, 1).double().transpose(-1, -2) / dim**0.5
    full_lse = torch.logsumexp(logits.masked_fill(~torch.ones(total, total, dtype=torch.bool).tril(), float("-inf")), -1)
    for b in range(blocks):
        start = anchor + b * block
        rows = list(range(anchor)) + list(range(start, start + block))
        keys = list(range(anchor, start)) + rows  # [passing = B0..B(b-1) | anchor | B_b]
        out, lse = apbv_attention(q[:, :, rows], k[:, :, keys], v[:, :, keys], anchor, start - anchor, dim**-0.5)
        torch.testing.assert_close(out, full[:, :, rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.double(), full_lse[:, :, rows], rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused_with_the_fix():
    q, k, v = random_inputs(0, 1, 4, 2, 5, 7, 11, 8)
    cases = [
        ((q, k, v, 5, 6), "Sk = passing_len \\+ Sq"),
        ((q, k[:, :1].expand(1, 3, -1, -1), v[:, :1].expand(1, 3, -1, -1), 5, 7), "multiple of"),
        ((q, k, v[..., :4], 5, 7), "same shape"),
        ((q, k, v, 17, -1), "anchor_len"),
        ((q[0], k, v, 5, 7), r"\[B, H, S, D\]"),
        ((q.half(), k, v, 5, 7), "dtype"),
    ]
    for (qq, kk, vv, anchor, passing), message in cases:
        with pytest.raises(InputError, match=message):
            apbv_attention(qq, kk, vv, anchor, passing, 0.5)


def test_opcheck():
    for heads, lengths in [((4, 2), (5, 7, 11)), ((2, 2), (0, 3, 6))]:
        torch.library.opcheck(torch.ops.vlmopt.apbv_attention.default, (*random_inputs(3, 2, *heads, *lengths, 8), lengths[0], lengths[1], 0.3))


def test_flop_formula_counts_the_visible_pairs():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from vlmopt.flops import register_flop_formulas

    register_flop_formulas()  # the formula comes from the op file, as vlmopt.flops finds it
    anchor, passing, block, batch, heads, dim = 5, 7, 11, 2, 4, 16
    q, k, v = random_inputs(1, batch, heads, 2, anchor, passing, block, dim)
    want = 4 * batch * heads * dim * int(mask_by_rules(anchor, passing, block).sum())
    for mode in (None, FakeTensorMode()):
        args = (q, k, v) if mode is None else tuple(mode.from_tensor(x) for x in (q, k, v))
        counter = FlopCounterMode(display=False)
        with counter:
            apbv_attention(*args, anchor, passing, 0.25)
        assert counter.get_total_flops() == want


def test_onnx_translation_matches_the_op(tmp_path):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'vlmopt[onnx]')")
    pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'vlmopt[onnx]')")
    from vlmopt.export.onnx import ort_session
    from vlmopt.export.onnx_ops import translation_table
    from vlmopt.export.trt_check import check_tensorrt

    class Layer(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.vlmopt.apbv_attention(q, k, v, 5, 7, 0.3)

    path = tmp_path / "apbv_attention.onnx"
    torch.onnx.export(Layer().eval(), random_inputs(0, 2, 4, 2, 5, 7, 11, 8), dynamo=True, custom_translation_table=translation_table(Layer(), random_inputs(0, 2, 4, 2, 5, 7, 11, 8), "layer"), opset_version=18).save(path)
    assert check_tensorrt(path).ok, check_tensorrt(path).format()
    session = ort_session(path)
    for seed in (1, 2):
        args = random_inputs(seed, 2, 4, 2, 5, 7, 11, 8)
        got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
        for want, have in zip(Layer()(*args), got):
            np.testing.assert_allclose(have, want.numpy(), rtol=1e-5, atol=1e-6)


KERNEL_CHECK = """
import torch
from vlmopt.kernels.apbv_attention import apbv_attention_triton
from vlmopt.ops.apbv_attention import reference
generator = torch.Generator().manual_seed(0)
cases = [  # batch, heads, kv_heads, anchor, passing, block, dim, block_m, block_n
    (2, 4, 2, 5, 7, 11, 16, 16, 16),
    (1, 4, 4, 5, 7, 11, 8, 16, 32),
    (1, 3, 1, 0, 9, 13, 12, 16, 16),
    (1, 2, 2, 37, 0, 6, 16, 16, 16),   # anchor-only query blocks, no passing
    (1, 4, 2, 40, 33, 50, 32, 16, 32),  # anchor-only blocks start past the passing keys
]
for batch, heads, kv_heads, anchor, passing, block, dim, block_m, block_n in cases:
    sq, sk = anchor + block, passing + anchor + block
    # [B, S, H, D] storage read as [B, H, S, D]: strided, as a model's projections give them
    q = torch.randn(batch, sq, heads, dim, generator=generator).transpose(1, 2)
    k = torch.randn(batch, sk, kv_heads, dim, generator=generator).transpose(1, 2)
    v = torch.randn(batch, sk, kv_heads, dim, generator=generator).transpose(1, 2)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        args = (q.to(dtype), k.to(dtype), v.to(dtype), anchor, passing, dim ** -0.5)
        out, lse = apbv_attention_triton(*args, block_m=block_m, block_n=block_n)
        want_out, want_lse = reference(*args)
        assert out.dtype == dtype and lse.dtype == torch.float32
        error = ((out.float() - want_out.float()).norm() / want_out.float().norm()).item()
        assert error < tolerance, (batch, heads, anchor, passing, block, dtype, error)
        assert (lse - want_lse).abs().max().item() < 1e-5, (anchor, passing, block, dtype)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install vlmopt[triton])")
def test_triton_kernel_in_the_interpreter():
    """The CUDA kernel, run by Triton's CPU interpreter on odd lengths, strided inputs, GQA/MHA/MQA,
    fp32, fp16 and bf16, block sizes that do not divide the lengths, against the reference."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(KERNEL_CHECK)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


AOT_COMPILE = """
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vlmopt.kernels.apbv_attention import _apbv_forward, default_config
for dtype, fp32_dot in (("bf16", False), ("fp16", False), ("fp32", True)):
    signature = {}
    for name in inspect.signature(_apbv_forward.fn).parameters:
        if name.endswith("_ptr"):
            signature[name] = "*fp32" if name == "lse_ptr" else "*" + dtype
        elif name == "qk_scale_log2":
            signature[name] = "fp32"
        elif name.isupper() or name == "FP32_DOT":
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    import torch
    config = default_config({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype], 128)
    constants = {"BLOCK_M": config["block_m"], "BLOCK_N": config["block_n"], "BLOCK_D": 128, "FP32_DOT": fp32_dot}
    source = ASTSource(fn=_apbv_forward, signature=signature, constexprs=constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 227 * 1024, (dtype, kernel.metadata.shared)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install vlmopt[triton])")
def test_kernel_compiles_for_hopper_without_a_gpu():
    """The GPU path the interpreter does not take (native fp16/bf16 ``tl.dot``) lowers to an sm_90
    cubin with the GPU launch defaults and fits an H100's shared memory (Triton's bundled ptxas)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(AOT_COMPILE)], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("triton's bundled ptxas is missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_kernel_on_gpu(dtype):
    """The op on CUDA tensors (the compiled Triton kernel) against the reference, Qwen2.5-VL-7B heads."""
    for anchor, passing, block in [(128, 384, 300), (0, 500, 257), (77, 0, 129)]:
        q, k, v = (x.cuda() for x in random_inputs(anchor + block, 1, 28, 4, anchor, passing, block, 128, dtype))
        out, lse = torch.ops.vlmopt.apbv_attention(q, k, v, anchor, passing, 128**-0.5)
        want_out, want_lse = reference(q, k, v, anchor, passing, 128**-0.5)
        error = ((out.float() - want_out.float()).norm() / want_out.float().norm()).item()
        assert error < (2e-3 if dtype == torch.float16 else 1.6e-2), error
        assert (lse - want_lse).abs().max().item() < 2e-2
