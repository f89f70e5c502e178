"""vlmopt::gather_sequence against a loop, padding slots, gradients."""

import torch

from vlmopt.ops.gather_sequence import gather_sequence


def loop_reference(x, index, batch_dim, seq_dim):
    moved = x.movedim((batch_dim, seq_dim), (0, 1))
    out = torch.zeros((index.shape[0], index.shape[1]) + moved.shape[2:], dtype=x.dtype)
    for b in range(index.shape[0]):
        for j, position in enumerate(index[b].tolist()):
            if position >= 0:
                out[b, j] = moved[b, position]
    return out.movedim((0, 1), (batch_dim, seq_dim))


def random_index(generator, batch, seq, kept):
    rows = []
    for b in range(batch):
        count = kept - b  # rows keep different counts: left padding
        positions = torch.randperm(seq, generator=generator)[:count].sort().values.tolist()
        rows.append([-1] * (kept - count) + positions)
    return torch.tensor(rows)


def test_matches_loop_for_every_layout():
    generator = torch.Generator().manual_seed(0)
    index = random_index(generator, 2, 11, 7)
    cases = [
        (torch.randn(2, 11, 4, generator=generator), 0, 1),
        (torch.randint(0, 2, (2, 11), generator=generator), 0, 1),
        (torch.randint(0, 50, (3, 2, 11), generator=generator), 1, 2),
    ]
    for x, batch_dim, seq_dim in cases:
        assert torch.equal(gather_sequence(x, index, batch_dim, seq_dim), loop_reference(x, index, batch_dim, seq_dim))


def test_padding_reads_zero_and_bool_masks():
    mask = torch.ones(1, 5, dtype=torch.bool)
    out = gather_sequence(mask, torch.tensor([[-1, -1, 0, 3]]), 0, 1)
    assert out.tolist() == [[False, False, True, True]]


def test_opcheck_and_gradients():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 3, generator=generator, dtype=torch.double, requires_grad=True)
    index = random_index(generator, 2, 9, 5)
    torch.library.opcheck(torch.ops.vlmopt.gather_sequence.default, (x, index, 0, 1))
    assert torch.autograd.gradcheck(lambda t: gather_sequence(t, index, 0, 1), (x,))
