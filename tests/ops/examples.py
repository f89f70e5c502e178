"""Inputs of every ``vlmopt::`` op, for the checks that run all ops the same way: the device and
dtype audit (``tests/device/``) and the GPU check's kernels (``benchmarks/gpu_check.py``).

``EXAMPLES[name](generator)`` returns a list of argument tuples for ``vlmopt::<name>`` (and its
``reference``): CPU tensors, floats in float32, drawn fresh from ``generator`` — the shapes of the
op's own tests. A new op file needs an entry here; ``tests/device/test_op_references.py`` fails
naming the op until it has one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Generator, Tensor


def _randn(generator: Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=generator)


def _rand(generator: Generator, *shape: int) -> Tensor:
    return torch.rand(*shape, generator=generator)


def _sorted_subset(generator: Generator, total: int, count: int) -> Tensor:
    return torch.randperm(total, generator=generator)[:count].sort().values


def apbv_attention(g):
    def case(heads, kv_heads, anchor, passing, block):
        query, key = anchor + block, passing + anchor + block
        q, k, v = _randn(g, 2, heads, query, 8), _randn(g, 2, kv_heads, key, 8), _randn(g, 2, kv_heads, key, 8)
        return q, k, v, anchor, passing, 0.3

    return [case(4, 2, 5, 7, 11), case(2, 2, 0, 3, 6)]


def apbv_compress(g):
    return [(_randn(g, 1, 4, 3, 8), _randn(g, 1, 2, 17, 8), 6, 5)]


def compact_positions(g):
    positions = torch.randint(0, 40, (2, 3, 7), generator=g).sort(dim=2).values
    return [(positions, 2, -1), (positions, 2, 10)]


def cross_layer_smooth(g):
    return [(_rand(g, 3, 7), [0.1, 0.3, 0.4])]


def evicted_mean(g):
    keep = torch.stack([_sorted_subset(g, 7, 4) for _ in range(2)])  # index 6 is the summary slot
    return [(_randn(g, 2, 2, 6, 4), _randn(g, 2, 2, 6, 4), keep)]


def gather_sequence(g):
    index = torch.stack([torch.cat([torch.full((b,), -1), _sorted_subset(g, 11, 7 - b)]) for b in range(2)])
    return [
        (_randn(g, 2, 11, 4), index, 0, 1),
        (torch.randint(0, 2, (2, 11), generator=g), index, 0, 1),
        (torch.randint(0, 50, (3, 2, 11), generator=g), index, 1, 2),
    ]


def hiprune_select(g):
    return [(_rand(g, 20), _rand(g, 20), [1, 4, 5], [8], [2]), (_rand(g, 44), _rand(g, 44), [1, 4, 5, 2, 3, 4], [6, 9], [1, 2])]


def kcenter_select(g):
    x = _randn(g, 2, 14, 5) * _rand(g, 2, 14, 1) * 3
    candidates = _rand(g, 2, 14) < 0.75
    anchors = _rand(g, 2, 14) < 0.15
    return [(x, candidates, anchors, 4)]


def last_token_attention(g):
    key_mask = _rand(g, 2, 9) < 0.6
    key_mask[:, 0] = True
    return [(_randn(g, 2, 4, 8), _randn(g, 2, 2, 9, 8), key_mask, 0.5)]


def lse_merge(g):
    lses = _randn(g, 3, 2, 4, 5)
    lses[1, 0, 2] = float("-inf")  # an empty part contributes nothing
    return [(_randn(g, 3, 2, 4, 5, 8), lses)]


def merge_visual(g):
    return [(_randn(g, 2, 9, 5), _randn(g, 6, 5), _sorted_subset(g, 18, 6))]


def pool_tokens(g):
    return [(_randn(g, 24, 4), [1, 4, 6], [2, 3]), (_randn(g, 76, 3), [1, 6, 6, 2, 4, 5], [3, 2, 2, 3])]


def pseudo_query_attention(g):
    return [(_randn(g, 2, 4, 3, 8), _randn(g, 2, 2, 10, 8), 4, 0.3)]


def random_scores(g):
    return [(_randn(g, 3), [3, 4], 0)]


def received_attention(g):
    return [(_randn(g, 2, 9, 8), _randn(g, 2, 9, 8), 2, 0.5)]


def recency_scores(g):
    return [(_rand(g, 3, 7), [20.0, 5.0, 0.0])]


def regate_mask(g):
    return [(_randn(g, 2, 9), _rand(g, 2, 9) > 0.4, 0.5)]


def rerotate_keys(g):
    return [(_randn(g, 2, 2, 5, 8), _randn(g, 2, 5, 8), _randn(g, 2, 5, 8))]


def sequence_keep_index(g):
    visual = torch.tensor([1, 2, 3, 7, 8])
    return [(visual, visual[_sorted_subset(g, 5, 2)], 2, 5, 4)]


def tier_blend(g):
    return [(_rand(g, 3, 7), _rand(g, 3, 7), [1.0, 0.5, 0.0])]


def tier_keep_index(g):
    return [(_rand(g, 2, 9), 3, 4, [False, True]), (_rand(g, 2, 3), 3, 4, [False, True])]


def topk_indices(g):
    return [(_randn(g, 10), [4, 6], [2, 3])]


#: Op name → its example arguments (see the module docstring).
EXAMPLES: dict[str, Callable[[Generator], list[tuple]]] = {
    name: function for name, function in dict(globals()).items()
    if callable(function) and not name.startswith("_") and getattr(function, "__module__", None) == __name__
}
