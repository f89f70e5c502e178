"""The family registry: adapters by HF class, capabilities passes need, paper settings, the decoder-layer view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
from torch import nn

import vlmopt
from vlmopt import configs
from vlmopt.adapters import CAPABILITIES, REGISTRY, DecoderLayerView, adapter_class, families
from vlmopt.errors import IncompatiblePassError, UnsupportedModelError
from vlmopt.passes.base import Pass


def test_every_registered_class_builds_from_its_configs_and_finds_its_adapter():
    for cls in families():
        assert cls.capabilities <= set(CAPABILITIES)
        assert set(cls.paper_settings) <= set(vlmopt.passes.REGISTRY), f"{cls.__name__}: paper settings for unknown passes"
        tiny = [named for name, named in cls.configs.items() if name.endswith("-random")]
        assert tiny, f"{cls.__name__} has no random-weight config"
        model = configs.build(tiny[0].make(), device="meta")
        assert adapter_class(model) is cls and REGISTRY[type(model).__name__] is cls


def test_an_unknown_model_is_refused_naming_the_supported_classes():
    with pytest.raises(UnsupportedModelError, match="supported model classes are .*LlavaForConditionalGeneration"):
        vlmopt.compile(nn.Linear(2, 2))


@dataclass(frozen=True)
class NeedsVideo(Pass):
    """A pass that needs a capability LLaVA does not have."""

    needs: ClassVar[tuple[str, ...]] = ("video", "vision_qk")

    def apply(self, graph) -> None:
        raise AssertionError("a refused pass is never applied")


def test_a_missing_capability_is_refused_before_tracing(llava_clip):
    with pytest.raises(IncompatiblePassError, match=r"NeedsVideo needs what LlavaAdapter .* does not provide — video: video inputs$"):
        vlmopt.compile(llava_clip, passes=[NeedsVideo()])


def test_the_view_refuses_a_layer_that_lacks_a_part():
    layer = nn.Module()
    layer.input_layernorm = nn.LayerNorm(4)
    layer.self_attn = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(layer.self_attn, name, nn.Linear(4, 4))
    layer.self_attn.scaling = 0.5
    layer.post_attention_layernorm = nn.LayerNorm(4)
    layer.mlp = nn.Linear(4, 4)
    DecoderLayerView().check(layer)
    with pytest.raises(UnsupportedModelError, match=r"lacks q_norm \(self_attn.q_norm\), k_norm \(self_attn.k_norm\)"):
        DecoderLayerView(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm").check(layer)


def test_paper_settings_reach_the_passes():
    from vlmopt.adapters.llava import LlavaAdapter
    from vlmopt.adapters.qwen2_5_vl import Qwen25VLAdapter
    from vlmopt.passes import HalfV, Hermes

    assert HalfV().saturation(LlavaAdapter) == "inactive_rows" and HalfV().saturation(Qwen25VLAdapter) == "sparse_tokens"
    assert Hermes().paper_setting(LlavaAdapter, "working_schedule", None) == (1.0, -0.9, 20.0, -19.5)
