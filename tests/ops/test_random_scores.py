"""vlmopt::random_scores depends only on the seed and the token count."""

import torch

from vlmopt.ops.random_scores import random_scores


def test_depends_on_seed_and_count_only():
    like = torch.empty(0)
    alone = random_scores(like, [12], 7)
    batched = random_scores(like, [5, 12, 12], 7)
    assert torch.equal(batched[5:17], alone)
    assert torch.equal(batched[17:], alone)
    assert not torch.equal(random_scores(like, [12], 8), alone)
    assert alone.min() >= 0 and alone.max() < 1 and alone.std() > 0.1


def test_opcheck():
    torch.library.opcheck(torch.ops.vlmopt.random_scores.default, (torch.empty(3), [3, 4], 0))
