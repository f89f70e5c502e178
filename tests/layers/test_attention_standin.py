"""The attention stand-in runs a decoder layer's own modules around a replaced attention: with plain
causal attention it equals the HF layer, it shares (never copies) the layer's weights, and a model
without separate q/k/v/o projections is refused."""

import pytest
import torch
from torch import nn

from vlmopt import configs
from vlmopt.adapters import DecoderLayerView, adapter_for
from vlmopt.adapters.llava import llava_config
from vlmopt.adapters.qwen2_5_vl import qwen25vl_config
from vlmopt.distributed.attention import dense_attention
from vlmopt.errors import UnsupportedModelError
from vlmopt.layers.attention_standin import AttentionStandIn


class CausalAttention(nn.Module):
    def forward(self, q, k, v, *, cache, layer_idx, scale, context):
        seq = q.shape[2]
        visible = torch.ones(seq, seq, dtype=torch.bool).tril()
        return dense_attention(q, k, v, scale, visible)[0]


@pytest.mark.parametrize("make", [qwen25vl_config, llava_config])
def test_standin_with_causal_attention_equals_the_layer(make):
    model = configs.build(make(), seed=5)
    text = model.model.language_model
    layer = text.layers[1]
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, 13, text.config.hidden_size, generator=generator)
    positions = torch.arange(13).expand(2, 13)
    if make is qwen25vl_config:
        positions = positions.unsqueeze(0).expand(3, 2, 13)
    cos, sin = text.rotary_emb(hidden, positions)
    mask = torch.ones(13, 13, dtype=torch.bool).tril()[None, None].expand(2, 1, 13, 13)
    with torch.no_grad():
        expected = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
        expected = expected[0] if isinstance(expected, tuple) else expected
        view = adapter_for(model).decoder_view
        got = AttentionStandIn(layer, CausalAttention(), view)(hidden, cos, sin, None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    stand_in = AttentionStandIn(layer, CausalAttention(), view)
    assert stand_in.layer.self_attn.q_proj.weight is layer.self_attn.q_proj.weight


def test_fused_projections_are_refused():
    layer = nn.Module()
    layer.self_attn = nn.Module()
    layer.self_attn.qkv_proj = nn.Linear(4, 12)
    with pytest.raises(UnsupportedModelError, match=r"lacks input_norm \(input_layernorm\), q_proj \(self_attn.q_proj\)"):
        AttentionStandIn(layer, CausalAttention(), DecoderLayerView())
