"""``compile`` takes a model with any attention implementation, keeps it, and stays bit-exact with the
HF model running the same one: eager and SDPA here (every family), a registered implementation
(how hub kernels plug in) runs inside the compiled graphs; flash-attention runs in the GPU check
(``benchmarks/gpu_check.py``, part ``attention``)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import vlmopt
from tests.conftest import padded_batch
from tests.device import flows

FAMILIES = list(flows.family_configs())


def implementations(model) -> dict[str, str]:
    """The attention implementation of the model's config and of each of its sub-configs."""
    config = model.config
    found = {"model": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}):
        found[key] = getattr(config, key)._attn_implementation
    return found


@pytest.mark.parametrize("implementation", ["eager", "sdpa", {"vision_config": "eager", "text_config": "sdpa"}], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_keeps_the_implementation_and_is_bit_exact(family, implementation):
    model = flows.build(family)
    model.set_attn_implementation(implementation)
    given = implementations(model)
    batch = padded_batch(model, seed=31)
    compiled = vlmopt.compile(model, passes=["random_prune:keep_ratio=1.0"])
    with torch.no_grad():
        assert torch.equal(compiled(**batch).logits, model(**batch).logits)
        expected = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(compiled.generate(**batch, max_new_tokens=4), expected)
    assert implementations(model) == given, "compile changed the model's attention implementation"


@pytest.fixture
def counting_attention():
    """An attention implementation registered with HF (as hub kernels are), counting its calls."""
    calls: list[tuple[int, ...]] = []

    def counting(module, query, key, value, attention_mask, **kwargs):
        calls.append(tuple(query.shape))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS["vlmopt_counting"] = counting
    ALL_MASK_ATTENTION_FUNCTIONS["vlmopt_counting"] = sdpa_mask
    yield calls
    del ALL_ATTENTION_FUNCTIONS["vlmopt_counting"], ALL_MASK_ATTENTION_FUNCTIONS["vlmopt_counting"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_registered_implementation_runs_inside_the_compiled_graphs(family, counting_attention):
    model = flows.build(family)
    model.set_attn_implementation("vlmopt_counting")
    batch = padded_batch(model, seed=32)
    with torch.no_grad():
        expected = model(**batch).logits
        hf_calls = list(counting_attention)
        counting_attention.clear()
        got = vlmopt.compile(model)(**batch).logits
    assert torch.equal(got, expected)
    # every attention call of the compiled graphs is one of HF's (the graphs may skip tower blocks
    # whose output the LLM never reads), and every decoder layer made one
    assert not Counter(counting_attention) - Counter(hf_calls), "the compiled model ran attention HF does not"
    assert len(counting_attention) >= model.config.get_text_config().num_hidden_layers
    assert implementations(model)["model"] == "vlmopt_counting"
