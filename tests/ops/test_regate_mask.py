"""vlmopt::regate_mask keeps the top ⌈keep·n⌉ answer tokens of each sequence by score, ties to the lower index."""

import math

import pytest
import torch

from vlmopt.ops import regate_mask as module


def naive(scores: torch.Tensor, answer: torch.Tensor, keep: float) -> torch.Tensor:
    out = torch.zeros_like(answer)
    for b in range(scores.shape[0]):
        candidates = [i for i in range(scores.shape[1]) if answer[b, i]]
        count = math.ceil(round(keep * len(candidates), 9))
        ranked = sorted(candidates, key=lambda i: (-float(scores[b, i]), i))
        for i in ranked[:count]:
            out[b, i] = True
    return out


@pytest.mark.parametrize("keep", [0.5, 0.3, 1 / 3, 0.75, 1.0, 0.01])
def test_matches_a_naive_loop(keep):
    generator = torch.Generator().manual_seed(int(keep * 1000))
    for trial in range(6):
        size, length = 3 + trial % 2, 17 + 2 * trial  # odd lengths, odd answer counts below
        scores = torch.randn(size, length, generator=generator)
        if trial % 2:
            scores = torch.randint(0, 3, (size, length), generator=generator).float()  # many ties
        answer = torch.rand(size, length, generator=generator) < 0.6
        answer[0] = False  # a sequence without an answer keeps nothing
        answer[1, :7] = True
        answer[1, 7:] = False  # 7 answer tokens
        got = torch.ops.vlmopt.regate_mask(scores, answer, keep)
        assert torch.equal(got, naive(scores, answer, keep)), (keep, trial)
        assert not (got & ~answer).any()
        expected = [math.ceil(round(keep * int(n), 9)) for n in answer.sum(1)]
        assert got.sum(1).tolist() == expected


def test_keep_one_is_the_answer_mask_and_ties_go_low():
    answer = torch.tensor([[False, True, True, True, True, False]])
    scores = torch.tensor([[9.0, 1.0, 2.0, 2.0, 2.0, 9.0]])
    assert torch.equal(torch.ops.vlmopt.regate_mask(scores, answer, 1.0), answer)
    kept = torch.ops.vlmopt.regate_mask(scores, answer, 0.5)  # ⌈0.5·4⌉ = 2 of three tied 2.0s: the first two
    assert kept.nonzero()[:, 1].tolist() == [2, 3]
    assert module.kept_counts(torch.ones(1, 10, dtype=torch.bool), 0.3).item() == 3  # not ceil(3.0000000000000004)


def test_refuses_bad_arguments_and_has_an_exact_fake():
    scores, answer = torch.randn(2, 5), torch.rand(2, 5) > 0.5
    with pytest.raises(ValueError, match="keep must be a fraction"):
        torch.ops.vlmopt.regate_mask(scores, answer, 0.0)
    with pytest.raises(ValueError, match="must both be"):
        torch.ops.vlmopt.regate_mask(scores, answer.float(), 0.5)
    torch.library.opcheck(torch.ops.vlmopt.regate_mask.default, (scores, answer, 0.5))
    assert module.flop_formula is None and module.onnx_translation is None
