"""Reference-model architectures: the configs they build and what their rotary positions can resolve."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

from vlmopt.models import arch as archs
from vlmopt.models import processing


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return processing.build_processor("qwen", 448, 112).tokenizer


def column_turns(theta: float, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(angle each rotary pair turns from the first to the last of 16 merged columns, |change| of the other pairs)."""
    text = archs.qwen_config(archs.QwenArch(text_rope_theta=theta), tokenizer).text_config
    rotary = Qwen2_5_VLRotaryEmbedding(text)
    t, h, w0 = (int(v) for v in torch.randint(0, 200, (3,)))
    ids = torch.stack([torch.full((16,), t), torch.full((16,), h), torch.arange(w0, w0 + 16)])[:, None, :]
    cos, sin = rotary(torch.randn(1, 16, text.hidden_size), ids)
    half = cos.shape[-1] // 2
    angle = torch.atan2(sin[0, :, :half].double(), cos[0, :, :half].double())
    turn = torch.remainder(angle[-1] - angle[0] + torch.pi, 2 * torch.pi) - torch.pi
    width = sum(archs.mrope_section(half * 2)[:2])
    return turn[width:].abs(), turn[:width].abs()


def test_qwen_width_section_is_blind_to_columns_at_base_10000_and_not_at_100(qwen_tokenizer):
    at_default, others = column_turns(10000.0, qwen_tokenizer)
    assert at_default.max() < 0.06  # 15 columns × at most 0.0032 rad
    assert others.max() < 1e-5  # columns move only the width pairs
    at_100, _ = column_turns(100.0, qwen_tokenizer)
    assert 0.8 < at_100.max() < 0.9 and at_100.min() > 0.15


def test_qwen_config_carries_the_rotary_base_and_rejects_a_bad_one(qwen_tokenizer):
    text = archs.qwen_config(archs.QwenArch(text_rope_theta=30.0), qwen_tokenizer).text_config
    assert text.rope_parameters["rope_theta"] == 30.0
    with pytest.raises(ValueError, match="text_rope_theta"):
        archs.QwenArch(text_rope_theta=0.5)
