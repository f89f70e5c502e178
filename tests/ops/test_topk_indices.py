"""vlmopt::topk_indices: per-input top scores, ascending (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmopt.ops.topk_indices import topk_indices


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=4), st.integers(0, 2**31 - 1), st.floats(0.05, 1.0))
def test_each_segment_keeps_its_top_scores_sorted(counts, seed, ratio):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(sum(counts), generator=generator)
    keep = [max(1, int(ratio * c)) for c in counts]
    out = topk_indices(scores, counts, keep)
    assert out.shape == (sum(keep),)
    offset, start = 0, 0
    for count, k in zip(counts, keep):
        chosen = out[start : start + k]
        assert torch.all(chosen[1:] > chosen[:-1]), "ascending and unique"
        assert chosen.min() >= offset and chosen.max() < offset + count, "stays in its segment"
        expected = set((torch.argsort(scores[offset : offset + count], descending=True)[:k] + offset).tolist())
        assert set(chosen.tolist()) == expected
        offset += count
        start += k


def test_opcheck_and_errors():
    scores = torch.randn(10)
    torch.library.opcheck(torch.ops.vlmopt.topk_indices.default, (scores, [4, 6], [2, 3]))
    for counts, keep in (([4, 5], [2, 2]), ([4, 6], [5, 1])):
        try:
            topk_indices(scores, counts, keep)
        except ValueError:
            continue
        raise AssertionError(f"expected an error for counts={counts} keep={keep}")
