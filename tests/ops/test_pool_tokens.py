"""vlmopt::pool_tokens against explicit window means; anchors are window corners."""

import torch

from vlmopt.ops.pool_tokens import pool_tokens


def window_means(frame, out_h, out_w):
    h, w, _ = frame.shape
    rows = []
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
            rows.append(frame[r0:r1, c0:c1].reshape(-1, frame.shape[-1]).mean(0))
    return torch.stack(rows)


def test_matches_window_means_and_anchors():
    generator = torch.Generator().manual_seed(0)
    grids, out_grids = [1, 6, 6, 2, 4, 5], [3, 2, 2, 3]
    x = torch.randn(36 + 40, 3, generator=generator, dtype=torch.double)
    pooled, anchors = pool_tokens(x, grids, out_grids)
    expected = [window_means(x[:36].view(6, 6, 3), 3, 2)]
    for f in range(2):
        expected.append(window_means(x[36 + 20 * f : 56 + 20 * f].view(4, 5, 3), 2, 3))
    assert torch.allclose(pooled, torch.cat(expected), rtol=0, atol=1e-12)
    assert anchors[:6].tolist() == [0, 3, 12, 15, 24, 27]
    assert anchors[6:12].tolist() == [36 + a for a in (0, 1, 3, 10, 11, 13)]
    assert torch.all(anchors[1:] > anchors[:-1])


def test_opcheck():
    x = torch.randn(24, 4)
    torch.library.opcheck(torch.ops.vlmopt.pool_tokens.default, (x, [1, 4, 6], [2, 3]))


def test_gradients_reach_every_token():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(12 + 12, 2, generator=generator, dtype=torch.double, requires_grad=True)
    grids, out_grids = [1, 3, 4, 2, 2, 3], [2, 3, 1, 2]
    assert torch.autograd.gradcheck(lambda t: pool_tokens(t, grids, out_grids)[0], (x,))
    torch.library.opcheck(torch.ops.vlmopt.pool_tokens.default, (x, grids, out_grids))
