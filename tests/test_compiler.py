"""compile(): supported architectures, and refusing bad configurations before touching anything."""

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

import vlmopt
from vlmopt.adapters.base import REGISTRY


def test_unsupported_model_names_the_supported_classes():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50))
    with pytest.raises(vlmopt.UnsupportedModelError, match="cannot compile LlamaForCausalLM: supported model classes are") as refused:
        vlmopt.compile(model)
    assert all(name in str(refused.value) for name in REGISTRY), str(refused.value)


def test_unknown_backend(llava_clip):
    with pytest.raises(vlmopt.PassConfigError, match="backend must be one of eager, inductor"):
        vlmopt.compile(llava_clip, backend="tensorrt")


def test_unknown_pass_in_compile(llava_clip):
    with pytest.raises(vlmopt.UnknownPassError, match="known passes"):
        vlmopt.compile(llava_clip, passes=["no_such_pass:keep_ratio=0.5"])


def test_compiled_graph_has_roles_everywhere(any_model):
    compiled = vlmopt.compile(any_model, passes=["random_prune:keep_ratio=0.5"])
    for name, module in compiled.graph:
        for node in module.graph.nodes:
            assert "role" in node.meta and "stage" in node.meta, f"{name}:{node.name}"
    code = compiled.graph.code
    assert "# stage: prefill\n" in code and "# stage: decode\n" in code
    assert "random_scores" in code


def test_weights_are_shared_not_copied(llava_clip):
    compiled = vlmopt.compile(llava_clip)
    model_params = {p.data_ptr() for p in llava_clip.parameters()}
    assert {p.data_ptr() for p in compiled.parameters()} <= model_params
    assert repr(compiled).startswith("CompiledVLM(LlavaForConditionalGeneration; no passes")
