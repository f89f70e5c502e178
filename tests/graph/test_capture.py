"""Capture: one node per HF submodule call, roles and stages everywhere, weights shared."""

import pytest

import vlmopt
from vlmopt.graph.capture import STAGE_OF_ROLE


def roles(module):
    return [n.meta["role"] for n in module.graph.nodes]


def test_llava_prefill_structure(llava_clip):
    graph = vlmopt.compile(llava_clip).graph
    prefill = roles(graph["prefill"])
    tower_layers = llava_clip.config.vision_config.num_hidden_layers
    assert prefill.count("vision_block") == tower_layers - 1, "layers after the feature layer are skipped"
    assert prefill.count("decoder_layer") == llava_clip.config.text_config.num_hidden_layers
    for role in ("vision_embed", "vision_norm", "feature_select", "visual_tokens", "projector", "merge", "lm_head"):
        assert role in prefill
    assert "vision_block" not in roles(graph["decode"])


def test_qwen_prefill_structure(qwen):
    prefill = roles(vlmopt.compile(qwen).graph["prefill"])
    assert prefill.count("vision_block") == qwen.config.vision_config.depth
    module = vlmopt.compile(qwen).graph["prefill"]
    permutes = [n for n in module.graph.nodes if getattr(n.target, "__name__", "") == "window_permute"]
    assert len(permutes) == 3  # hidden states, cos, sin
    assert "merger" in prefill and "visual_tokens" in prefill


def test_every_node_has_a_known_stage(any_model):
    for _, module in vlmopt.compile(any_model).graph:
        for node in module.graph.nodes:
            assert node.meta["stage"] == STAGE_OF_ROLE[node.meta["role"]]


def test_leaves_are_the_models_own_modules(qwen):
    module = vlmopt.compile(qwen).graph["prefill"]
    assert module.get_submodule("blocks.0") is qwen.model.visual.blocks[0]
    assert module.get_submodule("layers.2") is qwen.model.language_model.layers[2]
    assert module.get_submodule("lm_head") is qwen.lm_head


def test_sequence_dims_are_marked(qwen):
    module = vlmopt.compile(qwen).graph["prefill"]
    marked = {n.name: n.meta["seq_dim"] for n in module.graph.nodes if "seq_dim" in n.meta}
    assert marked["position_ids"] == (1, 2)  # M-RoPE ids [3, B, S]
    assert marked["attention_mask"] == (0, 1)
    assert marked["merge_visual"] == (0, 1)


def test_vlmgraph_accessors(llava_clip):
    graph = vlmopt.compile(llava_clip).graph
    assert graph.prefill is graph["prefill"]
    with pytest.raises(KeyError, match="stages are prefill, prefill_text, decode"):
        graph["vision"]
    assert repr(graph).startswith("VLMGraph(llava; prefill:")
