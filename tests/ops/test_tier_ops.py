"""The KV-tier ops of the streaming passes against hand-written expectations on seeded random inputs,
their fakes, and the re-rotation property: keys moved by Δ equal keys computed at the new position."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vlmopt  # noqa: F401 - registers the ops
from vlmopt.errors import InputError
from vlmopt.stream.functions import rotary_position_ids

ops = torch.ops.vlmopt


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pseudo_query_attention_matches_explicit_softmax():
    g = gen(0)
    q, k = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    got = ops.pseudo_query_attention(q, k, 4, 0.3)
    full = torch.softmax(q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3, dim=-1)  # [L, H, Q, N]
    torch.testing.assert_close(got, full.mean(dim=(1, 2))[:, 4:])
    with pytest.raises(InputError, match="multiple"):
        ops.pseudo_query_attention(torch.randn(2, 3, 3, 8), k, 0, 1.0)


def test_recency_blend_and_smoothing():
    g = gen(1)
    attention = torch.rand(3, 7, generator=g)
    recency = ops.recency_scores(attention, [20.0, 5.0, 0.0])
    ages = torch.arange(6, -1, -1) / 6
    torch.testing.assert_close(recency[1], torch.exp(-5.0 * ages))
    assert torch.all(recency[2] == 1) and recency[0, -1] == 1
    blended = ops.tier_blend(attention, recency, [1.0, 0.5, 0.0])
    norm = (attention - attention.amin(1, keepdim=True)) / (attention.amax(1, keepdim=True) - attention.amin(1, keepdim=True))
    torch.testing.assert_close(blended[2], norm[2])  # alpha 0: attention only; constant recency normalises to 0
    rec_norm = (recency[1] - recency[1].min()) / (recency[1].max() - recency[1].min())
    torch.testing.assert_close(blended[1], 0.5 * norm[1] + 0.5 * rec_norm)
    smooth = ops.cross_layer_smooth(blended, [0.1, 0.3, 0.4])
    torch.testing.assert_close(smooth[2], blended[2])
    torch.testing.assert_close(smooth[1], 0.7 * blended[1] + 0.3 * smooth[2])
    torch.testing.assert_close(smooth[0], 0.9 * blended[0] + 0.1 * smooth[1])


def test_tier_keep_index_keeps_prefix_top_and_summary_slot():
    scores = torch.rand(2, 9, generator=gen(2))
    keep = ops.tier_keep_index(scores, 3, 4, [False, True])
    assert keep.shape == (2, 7)
    assert keep[:, :3].tolist() == [[0, 1, 2]] * 2
    assert set(keep[0, 3:].tolist()) == set((scores[0].topk(4).indices + 3).tolist())
    assert set(keep[1, 3:-1].tolist()) == set((scores[1].topk(3).indices + 3).tolist()) and keep[1, -1] == 12
    assert torch.all(keep[:, 1:] > keep[:, :-1])
    # at or below the budget every entry stays, no summary
    assert torch.equal(ops.tier_keep_index(scores, 3, 9, [False, True]), torch.arange(12).expand(2, -1))


def test_evicted_mean_and_compaction():
    g = gen(3)
    keys, values = torch.randn(2, 2, 6, 4, generator=g), torch.randn(2, 2, 6, 4, generator=g)
    keep = torch.tensor([[0, 2, 3, 6], [0, 1, 2, 5]])
    mean_k, mean_v = ops.evicted_mean(keys, values, keep)
    torch.testing.assert_close(mean_k[0, :, 0], keys[0, :, [1, 4, 5]].mean(1))
    torch.testing.assert_close(mean_v[1, :, 0], values[1, :, [3, 4]].mean(1))
    positions = torch.tensor([[[0, 1, 5, 9, 9, 30], [0, 1, 2, 4, 3, 2], [0, 1, 2, 2, 7, 7]]])
    compacted = ops.compact_positions(positions, 2, -1)
    assert compacted.tolist() == [[[0, 1, 2, 3, 3, 4], [0, 1, 2, 4, 3, 2], [0, 1, 2, 2, 3, 3]]]
    assert torch.equal(ops.compact_positions(positions, 2, 30), positions)  # lazy: under the limit, unchanged


@pytest.mark.parametrize("family", ["qwen", "llava_clip"])
def test_rerotated_keys_equal_keys_at_the_new_position(family, request):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = request.getfixturevalue(family)
    text = model.model.language_model
    rotary, mrope = text.rotary_emb, family == "qwen"
    config = text.config
    g = gen(4)
    head_dim = config.hidden_size // config.num_attention_heads
    raw = torch.randn(2, config.num_key_value_heads, 5, head_dim, generator=g)
    axes = 3 if mrope else 1
    old = torch.randint(0, 500, (2, axes, 5), generator=g)
    new = torch.randint(0, 500, (2, axes, 5), generator=g)

    def rope(keys, positions):
        cos, sin = rotary(keys, rotary_position_ids(positions, mrope))
        return apply_rotary_pos_emb(keys, keys, cos, sin, unsqueeze_dim=1)[0]

    at_old, at_new = rope(raw, old), rope(raw, new)
    cos, sin = rotary(raw, rotary_position_ids(new - old, mrope))
    torch.testing.assert_close(ops.rerotate_keys(at_old, cos, sin), at_new, atol=2e-5, rtol=1e-4)


def test_fakes_give_the_real_shapes():
    g = gen(5)
    real = {
        "attention": (ops.pseudo_query_attention, (torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g), 2, 1.0)),
        "keep": (ops.tier_keep_index, (torch.rand(3, 9, generator=g), 2, 4, [False, False, True])),
        "rerotate": (ops.rerotate_keys, (torch.randn(2, 2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8))),
        "compact": (ops.compact_positions, (torch.randint(0, 9, (2, 3, 6), generator=g), 2, -1)),
    }
    for name, (op, args) in real.items():
        expected = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if torch.is_tensor(a) else a for a in args]
            got = op(*fake_args)
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
