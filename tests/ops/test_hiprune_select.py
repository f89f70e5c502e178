"""vlmopt::hiprune_select: properties (hypothesis) and equality with the paper's pseudocode."""

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vlmopt.ops.hiprune_select import ANCHOR, BUFFER, REGISTER, hiprune_select


def neighbours(index, t, h, w):
    frame, rest = divmod(index, h * w)
    row, col = divmod(rest, w)
    found = set()
    for d_row, d_col in ((0, -1), (0, 1), (-1, 0), (1, 0)):
        r, c = row + d_row, col + d_col
        if 0 <= r < h and 0 <= c < w:
            found.add(frame * h * w + r * w + c)
    return found


def paper_hiprune(obj, deep, t, h, w, budget, n_anchor):
    """HiPrune as the paper's pseudocode reads, with Python sets (arXiv 2508.00553, Alg. 1)."""
    anchors = set(sorted(range(len(obj)), key=lambda j: -obj[j])[:n_anchor])
    buffers = set().union(*[neighbours(a, t, h, w) for a in anchors]) - anchors if anchors else set()
    chosen = anchors | buffers
    registers = [j for j in sorted(range(len(deep)), key=lambda j: -deep[j]) if j not in chosen]
    return sorted(chosen | set(registers[: budget - len(chosen)])), anchors, buffers


@st.composite
def cases(draw):
    inputs = draw(st.integers(1, 3))
    grids, budgets, anchors = [], [], []
    for _ in range(inputs):
        t, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
        count = t * h * w
        budget = draw(st.integers(1, count))
        grids += [t, h, w]
        budgets.append(budget)
        anchors.append(draw(st.integers(0, budget)))
    return grids, budgets, anchors, draw(st.integers(0, 2**31 - 1))


def split(grids):
    return [tuple(grids[i : i + 3]) for i in range(0, len(grids), 3)]


@settings(max_examples=80, deadline=None)
@given(cases())
def test_properties(case):
    grids, budgets, anchors, seed = case
    total = sum(t * h * w for t, h, w in split(grids))
    generator = torch.Generator().manual_seed(seed)
    obj, deep = torch.rand(total, generator=generator), torch.rand(total, generator=generator)
    indices, kinds = hiprune_select(obj, deep, grids, budgets, anchors)
    assert indices.shape == kinds.shape == (sum(budgets),), "budget filled exactly"
    offset, start = 0, 0
    for (t, h, w), budget, n_anchor in zip(split(grids), budgets, anchors):
        count = t * h * w
        mine = indices[start : start + budget] - offset
        kind = kinds[start : start + budget]
        assert torch.all(mine[1:] > mine[:-1]), "sorted and unique"
        assert mine.min() >= 0 and mine.max() < count
        top = set(torch.topk(obj[offset : offset + count], n_anchor).indices.tolist())
        kept_anchors = set(mine[kind == ANCHOR].tolist())
        assert kept_anchors == top, "anchors are the top object-layer tokens, all kept"
        for b in mine[kind == BUFFER].tolist():
            assert any(b in neighbours(a, t, h, w) for a in top), "buffers neighbour an anchor, no wrap"
        ring = set().union(*[neighbours(a, t, h, w) for a in top]) - top if top else set()
        if n_anchor + len(ring) <= budget:
            assert set(mine[kind == BUFFER].tolist()) == ring, "every neighbour is kept when the budget allows"
        registers = mine[kind == REGISTER]
        if len(registers):
            others = set(range(count)) - top - ring
            worst_kept = deep[offset + registers].min()
            dropped = torch.tensor(sorted(others - set(registers.tolist())), dtype=torch.long)
            if len(dropped):
                assert worst_kept >= deep[offset + dropped].max(), "registers are the deep layer's best of the rest"
        offset += count
        start += budget


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 9), st.integers(2, 9), st.integers(1, 2), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_equals_the_paper_pseudocode(h, w, t, ratio, seed):
    count = t * h * w
    budget = max(1, int(ratio * count))
    n_anchor = max(0, int(0.2 * budget / 5 + 0.5))
    assume(5 * n_anchor <= budget)
    generator = torch.Generator().manual_seed(seed)
    obj, deep = torch.rand(count, generator=generator), torch.rand(count, generator=generator)
    indices, kinds = hiprune_select(obj, deep, [t, h, w], [budget], [n_anchor])
    expected, anchors, buffers = paper_hiprune(obj.tolist(), deep.tolist(), t, h, w, budget, n_anchor)
    assert indices.tolist() == expected
    assert set(indices[kinds == ANCHOR].tolist()) == anchors
    assert set(indices[kinds == BUFFER].tolist()) == buffers


def test_row_edges_do_not_wrap():
    h, w = 3, 4
    obj = torch.zeros(12)
    obj[4] = 1.0  # row 1, column 0: its left neighbour would wrap to index 3
    deep = torch.linspace(0, 0.5, 12)
    indices, kinds = hiprune_select(obj, deep, [1, h, w], [4], [1])
    assert set(indices[kinds == BUFFER].tolist()) == {0, 5, 8}
    assert 3 not in indices[kinds != REGISTER].tolist()


def test_opcheck():
    obj, deep = torch.rand(20), torch.rand(20)
    torch.library.opcheck(torch.ops.vlmopt.hiprune_select.default, (obj, deep, [1, 4, 5], [8], [2]))
