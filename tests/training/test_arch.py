"""Reference-model architectures: the configs they build and what their rotary positions can resolve."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

from models import arch as archs
from vlmopt.reference import processing


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return processing.build_processor("qwen2_5_vl", 448, 112).tokenizer


def pair_axes(section: list[int]) -> torch.Tensor:
    """M-RoPE axis (0 temporal, 1 height, 2 width) of each rotary pair: chunk i of ``section`` is axis i mod 3."""
    return torch.cat([torch.full((size,), i % 3) for i, size in enumerate(section)])


def column_steps(theta: float, tokenizer, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(|angle| each width pair turns from one merged column to the next, |turn| of the other pairs)."""
    text = archs.qwen_config(archs.QwenArch(text_rope_theta=theta, text_mrope_interleaved=interleaved), tokenizer).text_config
    rotary = Qwen2_5_VLRotaryEmbedding(text)
    t, h, w0 = (int(v) for v in torch.randint(0, 200, (3,)))
    ids = torch.stack([torch.full((16,), t), torch.full((16,), h), torch.arange(w0, w0 + 16)])[:, None, :]
    cos, sin = rotary(torch.randn(1, 16, text.hidden_size), ids)
    half = cos.shape[-1] // 2
    angle = torch.atan2(sin[0, :, :half].double(), cos[0, :, :half].double())
    turn = (torch.remainder(angle[1:] - angle[:-1] + torch.pi, 2 * torch.pi) - torch.pi).abs().amax(dim=0)
    width = pair_axes(text.rope_parameters["mrope_section"]) == 2
    return turn[width], turn[~width]


def test_qwen_width_section_is_blind_to_columns_at_base_10000_and_not_at_100(qwen_tokenizer):
    at_default, others = column_steps(10000.0, qwen_tokenizer)
    assert at_default.max() < 0.0033  # the width section's fastest pair: 10000 ** (-10 / 16)
    assert others.max() < 1e-5  # columns move only the width pairs
    at_100, _ = column_steps(100.0, qwen_tokenizer)
    assert 0.05 < at_100.max() < 0.06


def test_interleaved_mrope_gives_columns_fast_pairs_and_leaves_text_alone(qwen_tokenizer):
    steps, others = column_steps(10000.0, qwen_tokenizer, interleaved=True)
    assert len(steps) == 5 and 0.31 < steps.max() < 0.32  # pair 2: 10000 ** (-2 / 16)
    assert others.max() < 1e-5
    # text tokens carry one id on all three axes, so their rotary is the same in either layout
    configs = [archs.qwen_config(archs.QwenArch(text_mrope_interleaved=flag), qwen_tokenizer).text_config for flag in (False, True)]
    start = int(torch.randint(0, 1000, ()))
    ids = torch.arange(start, start + 40).expand(3, 1, 40)
    x = torch.randn(1, 40, configs[0].hidden_size)
    (cos_a, sin_a), (cos_b, sin_b) = (Qwen2_5_VLRotaryEmbedding(c)(x, ids) for c in configs)
    assert torch.equal(cos_a, cos_b) and torch.equal(sin_a, sin_b)
    visual = torch.stack([torch.full((16,), start), torch.full((16,), start), torch.arange(start, start + 16)])[:, None, :]
    assert not torch.equal(Qwen2_5_VLRotaryEmbedding(configs[0])(x[:, :16], visual)[0], Qwen2_5_VLRotaryEmbedding(configs[1])(x[:, :16], visual)[0])


def test_qwen_config_carries_the_rotary_base_and_rejects_a_bad_one(qwen_tokenizer):
    text = archs.qwen_config(archs.QwenArch(text_rope_theta=30.0), qwen_tokenizer).text_config
    assert text.rope_parameters["rope_theta"] == 30.0
    with pytest.raises(ValueError, match="text_rope_theta"):
        archs.QwenArch(text_rope_theta=0.5)


def test_qwen3_interleaved_mrope_turns_columns_by_fast_pairs_and_text_like_plain_rope():
    """Qwen3-VL's own rotary (interleaved M-RoPE, sections 6/5/5 of 16 pairs): a merged column turns
    its five width pairs, the fastest by 10000 ** (-2 / 16) = 0.32 rad, and nothing else; text tokens
    (one id on all three axes) turn exactly as 1-D RoPE does."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    tokenizer = processing.build_processor("qwen3_vl", 448, 112).tokenizer
    text = archs.qwen3_config(archs.Qwen3Arch(), tokenizer).text_config
    rotary = Qwen3VLTextRotaryEmbedding(text)
    t, h, w0 = (int(v) for v in torch.randint(0, 200, (3,)))
    ids = torch.stack([torch.full((16,), t), torch.full((16,), h), torch.arange(w0, w0 + 16)])[:, None, :]
    cos, sin = rotary(torch.randn(1, 16, text.hidden_size), ids)
    half = cos.shape[-1] // 2
    angle = torch.atan2(sin[0, :, :half].double(), cos[0, :, :half].double())
    turn = (torch.remainder(angle[1:] - angle[:-1] + torch.pi, 2 * torch.pi) - torch.pi).abs().amax(dim=0)
    width = torch.zeros(half, dtype=torch.bool)
    width[2:15:3] = True  # Qwen3-VL deals pairs 2, 5, 8, 11, 14 to the width axis
    assert 0.31 < turn[width].max() < 0.32 and (turn[width] > 0).all()
    assert turn[~width].max() < 1e-5
    start = int(torch.randint(0, 1000, ()))
    positions = torch.arange(start, start + 40)
    cos_text, sin_text = rotary(torch.randn(1, 40, text.hidden_size), positions.expand(3, 1, 40))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, text.head_dim, 2).float() / text.head_dim))
    plain = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)
    torch.testing.assert_close(cos_text[0], plain.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin_text[0], plain.sin(), rtol=0, atol=1e-5)
