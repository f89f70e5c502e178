"""vlmopt::received_attention against dense softmax; the Triton kernel in the interpreter."""

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

from vlmopt.ops import received_attention as module
from vlmopt.ops.received_attention import received_attention, reference


def dense_column_means(q, k, heads, scale):
    n, s, width = q.shape
    qh = q.view(n, s, heads, -1).transpose(1, 2).double()
    kh = k.view(n, s, heads, -1).transpose(1, 2).double()
    probs = torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1)
    return probs.mean(dim=(1, 2))


@pytest.mark.parametrize("shape", [(2, 13, 4, 8), (1, 50, 2, 16), (3, 7, 1, 4)])
def test_matches_dense_softmax_column_means(shape):
    n, s, heads, dim = shape
    generator = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(n, s, heads * dim, generator=generator) * 2
    k = torch.randn(n, s, heads * dim, generator=generator) * 2
    scores = received_attention(q, k, heads, dim**-0.5)
    assert scores.dtype == torch.float32 and scores.shape == (n, s)
    torch.testing.assert_close(scores.double(), dense_column_means(q, k, heads, dim**-0.5), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scores.sum(-1), torch.ones(n), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, block_elements",
    [
        ((1, 1031, 2, 8), module.BLOCK_ELEMENTS),  # the real block size: 8 blocks of 127 query rows + 15
        ((3, 37, 3, 4), 37 * 3 * 5),  # 5 query rows of all heads per block, last block ragged (2 rows)
        ((5, 11, 2, 6), 2 * 11 * 11 * 2),  # two whole sequences per block, the last one alone
        ((2, 19, 1, 5), 1),  # one query row per block
    ],
)
def test_streamed_blocks_match_dense(shape, block_elements, monkeypatch):
    """The reference streams query blocks (running column sums); every blocking agrees with dense."""
    n, s, heads, dim = shape
    monkeypatch.setattr(module, "BLOCK_ELEMENTS", block_elements)
    generator = torch.Generator().manual_seed(1000 + s)
    q = torch.randn(n, s, heads * dim, generator=generator) * 3
    k = torch.randn(n, s, heads * dim, generator=generator) * 3
    scores = reference(q, k, heads, 0.7 * dim**-0.5)
    torch.testing.assert_close(scores.double(), dense_column_means(q, k, heads, 0.7 * dim**-0.5), rtol=1e-5, atol=1e-8)


def test_reference_is_differentiable_and_handles_bf16():
    """Training backpropagates through the reference; bf16 inputs are scored in float32."""
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(2, 29, 12, generator=generator, requires_grad=True)
    k = torch.randn(2, 29, 12, generator=generator, requires_grad=True)
    weights = torch.rand(2, 29, generator=generator)
    (reference(q, k, 3, 0.5) * weights).sum().backward()
    q2, k2 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    (dense_column_means(q2, k2, 3, 0.5) * weights.double()).sum().backward()
    torch.testing.assert_close(q.grad.double(), q2.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(k.grad.double(), k2.grad, rtol=1e-4, atol=1e-7)
    low = reference(q.detach().bfloat16(), k.detach().bfloat16(), 3, 0.5)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), dense_column_means(q.detach().bfloat16().float(), k.detach().bfloat16().float(), 3, 0.5))


def test_opcheck():
    q, k = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    torch.library.opcheck(torch.ops.vlmopt.received_attention.default, (q, k, 2, 0.5))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install vlmopt[triton])")
def test_triton_kernel_in_the_interpreter():
    """The CUDA kernel, run by Triton's CPU interpreter on odd sizes, fp32 and fp16, against the reference."""
    code = textwrap.dedent(
        """
        import torch
        from vlmopt.kernels.received_attention import received_attention_triton
        from vlmopt.ops.received_attention import reference
        generator = torch.Generator().manual_seed(0)
        for n, s, heads, dim, block in [(2, 37, 4, 8, 16), (1, 70, 2, 16, 32), (3, 17, 3, 12, 16)]:
            q = torch.randn(n, s, heads * dim, generator=generator)
            k = torch.randn(n, s, heads * dim, generator=generator)
            for dtype in (torch.float32, torch.float16):
                got = received_attention_triton(q.to(dtype), k.to(dtype), heads, dim ** -0.5, block=block)
                want = reference(q.to(dtype), k.to(dtype), heads, dim ** -0.5)
                error = ((got - want).norm() / want.norm()).item()
                assert error < 1e-5, (n, s, heads, dim, dtype, error)
        print("ok")
        """
    )
    env = dict(__import__("os").environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_kernel_on_gpu(dtype):
    """The op on CUDA tensors (the compiled Triton kernel) against the reference on the same inputs: a
    CLIP ViT-L/14-336 block's queries and keys (577 tokens, 16 heads of 64), two images."""
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 577, 16 * 64, generator=generator).to("cuda", dtype) for _ in range(2))
    got, want = received_attention(q, k, 16, 64**-0.5), reference(q, k, 16, 64**-0.5)
    assert got.dtype == torch.float32 and got.is_cuda
    assert ((got - want).norm() / want.norm()).item() < 1e-3
