"""vlmopt::sequence_keep_index keeps text and kept visual slots in order (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmopt.ops.sequence_keep_index import sequence_keep_index


@st.composite
def layouts(draw):
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(2, 12))
    visual, kept = [], []
    for b in range(batch):
        slots = draw(st.lists(st.integers(0, seq - 1), unique=True, max_size=seq))
        chosen = draw(st.lists(st.sampled_from(slots), unique=True)) if slots else []
        visual += [b * seq + s for s in sorted(slots)]
        kept += [b * seq + s for s in sorted(chosen)]
    return batch, seq, visual, kept


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_rows_keep_text_and_kept_visual_in_order(case):
    batch, seq, visual, kept = case
    expected_rows = []
    for b in range(batch):
        expected_rows.append([s for s in range(seq) if b * seq + s not in visual or b * seq + s in kept])
    out_len = max(len(r) for r in expected_rows)
    out = sequence_keep_index(torch.tensor(visual, dtype=torch.long), torch.tensor(kept, dtype=torch.long), batch, seq, out_len)
    assert out.shape == (batch, out_len)
    for b, expected in enumerate(expected_rows):
        assert out[b].tolist() == [-1] * (out_len - len(expected)) + expected


def test_opcheck():
    visual = torch.tensor([1, 2, 3, 7, 8])
    kept = torch.tensor([2, 8])
    torch.library.opcheck(torch.ops.vlmopt.sequence_keep_index.default, (visual, kept, 2, 5, 4))
