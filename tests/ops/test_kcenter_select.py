"""vlmopt::kcenter_select against a brute-force farthest-point loop over Python lists; the Triton
kernel in the interpreter; the ONNX translation in onnxruntime."""

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vlmopt.errors import InputError
from vlmopt.ops.kcenter_select import kcenter_select


def brute_force(x, candidates, anchors, k):
    """Farthest-point greedy recomputing every distance from scratch each step (float64 lists)."""
    picks = []
    for row in range(x.shape[0]):
        vectors = []
        for token in x[row].double().tolist():
            norm = max(math.sqrt(sum(v * v for v in token)), 1e-12)
            vectors.append([v / norm for v in token])
        selected = [j for j in range(x.shape[1]) if anchors[row, j]]
        chosen = []
        for _ in range(k):
            best, best_distance = None, -1.0
            for j in range(x.shape[1]):
                if not candidates[row, j] or anchors[row, j] or j in chosen:
                    continue
                distances = [1.0 - sum(a * b for a, b in zip(vectors[j], vectors[s])) for s in selected + chosen]
                distance = min(distances) if distances else 4.0
                if distance > best_distance:  # strict: ties keep the lowest index
                    best, best_distance = j, distance
            chosen.append(best)
        picks.append(sorted(chosen))
    return torch.tensor(picks, dtype=torch.long).reshape(x.shape[0], k)


def random_inputs(batch, tokens, width, seed, anchor_rate=0.15):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, width, generator=generator) * torch.rand(batch, tokens, 1, generator=generator) * 3
    candidates = torch.rand(batch, tokens, generator=generator) < 0.75  # holes
    anchors = torch.rand(batch, tokens, generator=generator) < anchor_rate  # some outside the candidates
    return x, candidates, anchors


CASES = [  # batch, tokens, width, k
    (2, 17, 5, 6),
    (3, 40, 16, 12),
    (1, 9, 3, 2),
    (4, 33, 7, 9),
]


@pytest.mark.parametrize("case", CASES)
def test_matches_brute_force(case):
    batch, tokens, width, k = case
    x, candidates, anchors = random_inputs(batch, tokens, width, seed=sum(case))
    anchors[0] = False  # one row starts from its first candidate
    got = kcenter_select(x, candidates, anchors, k)
    assert got.dtype == torch.long and got.shape == (batch, k)
    torch.testing.assert_close(got, brute_force(x, candidates, anchors, k))
    for row in range(batch):  # picks are distinct, ascending, eligible
        assert torch.all(got[row, 1:] > got[row, :-1])
        assert torch.all(candidates[row, got[row]]) and not torch.any(anchors[row, got[row]])


def test_every_available_candidate_and_none():
    x, candidates, anchors = random_inputs(2, 12, 4, seed=7)
    available = int((candidates & ~anchors).sum(1).min())
    got = kcenter_select(x, candidates, anchors, available)
    torch.testing.assert_close(got, brute_force(x, candidates, anchors, available))
    assert kcenter_select(x, candidates, anchors, 0).shape == (2, 0)


def test_without_anchors_the_first_pick_is_the_first_candidate_and_ties_go_low():
    x, candidates, _ = random_inputs(2, 10, 6, seed=3)
    candidates[:, :3] = False
    candidates[:, 3] = True
    anchors = torch.zeros_like(candidates)
    x[:, 8] = x[:, 5]  # an exact duplicate: once 5 is picked, 8 sits at distance 0
    got = kcenter_select(x, candidates, anchors, 1)
    assert got.tolist() == [[3], [3]]
    x_dup = x.clone()
    x_dup[:, 6] = x_dup[:, 7] = -x_dup[:, 3]  # two tokens at the same, maximal distance from token 3
    candidates[:, 4:] = True
    got = kcenter_select(x_dup, candidates, anchors, 2)
    assert got.tolist() == [[3, 6], [3, 6]]


def test_rows_are_normalised_by_the_op():
    x, candidates, anchors = random_inputs(3, 25, 8, seed=9)
    generator = torch.Generator().manual_seed(10)
    rescaled = x * (torch.rand(3, 25, 1, generator=generator) * 50 + 0.01)
    torch.testing.assert_close(kcenter_select(rescaled, candidates, anchors, 7), kcenter_select(x, candidates, anchors, 7))


def test_half_precision_input():
    x, candidates, anchors = random_inputs(2, 30, 12, seed=12)
    x = x.to(torch.bfloat16)
    torch.testing.assert_close(kcenter_select(x, candidates, anchors, 8), brute_force(x.float(), candidates, anchors, 8))


def test_too_large_k_and_bad_masks_are_named():
    x, candidates, anchors = random_inputs(2, 10, 4, seed=1)
    available = (candidates & ~anchors).sum(1).tolist()
    with pytest.raises(InputError, match=r"row\(s\) \[.*\] have only"):
        kcenter_select(x, candidates, anchors, max(available) + 1)
    with pytest.raises(InputError, match="anchors must be bool"):
        kcenter_select(x, candidates, anchors.long(), 1)
    with pytest.raises(InputError, match="k must be ≥ 0"):
        kcenter_select(x, candidates, anchors, -1)


def test_opcheck():
    x, candidates, anchors = random_inputs(2, 14, 5, seed=2)
    torch.library.opcheck(torch.ops.vlmopt.kcenter_select.default, (x, candidates, anchors, 4))


def test_flop_formula():
    from torch.utils.flop_counter import FlopCounterMode

    from vlmopt.flops import register_flop_formulas

    register_flop_formulas()  # the formula comes from the op file, as vlmopt.flops finds it
    x, candidates, anchors = random_inputs(2, 21, 6, seed=4)
    with FlopCounterMode(display=False) as counter:
        torch.ops.vlmopt.kcenter_select(x, candidates, anchors, 5)
    assert counter.get_total_flops() == 2 * 2 * 21 * 6 * 5 + 3 * 2 * 21 * 6


@pytest.mark.parametrize("k", [1, 6])
def test_onnx_translation_matches_onnxruntime(tmp_path, k):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'vlmopt[onnx]')")
    pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'vlmopt[onnx]')")
    from vlmopt.export.onnx import ort_session
    from vlmopt.export.trt_check import check_tensorrt
    from vlmopt.ops.kcenter_select import onnx_translation

    class Select(torch.nn.Module):
        def forward(self, x, candidates, anchors):
            return torch.ops.vlmopt.kcenter_select(x, candidates, anchors, k)

    def inputs(seed):
        x, candidates, anchors = random_inputs(3, 23, 7, seed)
        anchors[seed % 3] = False  # a row without anchors
        return x, candidates, anchors

    table = {torch.ops.vlmopt.kcenter_select.default: onnx_translation()}
    path = tmp_path / "kcenter.onnx"
    torch.onnx.export(Select().eval(), inputs(0), dynamo=True, custom_translation_table=table, opset_version=18).save(path)
    assert check_tensorrt(path).ok, check_tensorrt(path).format()
    session = ort_session(path)
    for seed in (1, 2):  # fresh inputs, not the ones the export was traced with
        args = inputs(seed)
        (got,) = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
        torch.testing.assert_close(torch.from_numpy(got), brute_force(*args, k))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install vlmopt[triton])")
def test_triton_kernel_in_the_interpreter():
    """The CUDA kernel, run by Triton's CPU interpreter on odd sizes and small blocks, against the reference."""
    code = textwrap.dedent(
        """
        import torch
        from vlmopt.kernels.kcenter_select import kcenter_select_triton
        from vlmopt.ops.kcenter_select import reference
        generator = torch.Generator().manual_seed(0)
        for batch, tokens, width, k, block_n, block_d in [(2, 37, 5, 9, 16, 16), (3, 70, 40, 20, 32, 16), (1, 16, 16, 16, 16, 16)]:
            x = torch.randn(batch, tokens, width, generator=generator)
            candidates = torch.rand(batch, tokens, generator=generator) < 0.8
            anchors = torch.rand(batch, tokens, generator=generator) < 0.1
            anchors[0] = False
            if tokens == 16:
                candidates[:], anchors[:] = True, False
            for dtype in (torch.float32, torch.float16):
                got = kcenter_select_triton(x.to(dtype), candidates, anchors, k, block_n=block_n, block_d=block_d)
                want = reference(x.to(dtype), candidates, anchors, k)
                assert torch.equal(got, want), (batch, tokens, width, k, dtype, got, want)
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def coverage(x, picks, candidates, anchors):
    """[B] the k-center objective: the largest distance from an eligible token to its nearest pick or anchor."""
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    chosen = anchors.clone().scatter(1, picks, True)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # [B, N, N]
    nearest = distance.masked_fill(~chosen[:, None, :], float("inf")).amin(-1)
    return nearest.masked_fill(~candidates | chosen, 0).amax(-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_kernel_on_gpu(dtype):
    """The op on CUDA tensors (the compiled Triton kernel) against the reference on the same inputs,
    HalfV's shape on LLaVA-1.5-7B (576 visual tokens of width 4096, 115 picks): the same picks, or
    (where fp32 sums in another order break a near tie) the same coverage."""
    from vlmopt.ops.kcenter_select import reference

    x, candidates, anchors = (t.cuda() for t in random_inputs(2, 576, 4096, seed=5))
    x = x.to(dtype)
    got, want = kcenter_select(x, candidates, anchors, 115), reference(x, candidates, anchors, 115)
    assert got.is_cuda and got.shape == want.shape
    if not torch.equal(got, want):
        torch.testing.assert_close(coverage(x, got, candidates, anchors), coverage(x, want, candidates, anchors), rtol=1e-3, atol=1e-4)
