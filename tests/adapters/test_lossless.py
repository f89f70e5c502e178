"""With no pass, a compiled model is bit-exact with the Hugging Face model (logits and greedy tokens)."""

import pytest
import torch

import vlmopt
from tests.conftest import padded_batch, row
from vlmopt import configs
from vlmopt.adapters.llava import llava_config


def hf_logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_prefill_logits_bit_exact(any_model):
    batch = padded_batch(any_model)
    compiled = vlmopt.compile(any_model)
    with torch.no_grad():
        assert torch.equal(compiled(**batch).logits, hf_logits(any_model, batch))


@pytest.mark.parametrize("rows", ["single", "padded_pair"])
def test_greedy_generate_token_identical(any_model, rows):
    batch = padded_batch(any_model, seed=5)
    if rows == "single":
        batch = row(batch, 1)
    compiled = vlmopt.compile(any_model)
    with torch.no_grad():
        expected = any_model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert torch.equal(compiled.generate(**batch, max_new_tokens=10), expected)


def test_compile_leaves_the_model_alone(any_model):
    batch = padded_batch(any_model, seed=7)
    before = hf_logits(any_model, batch)
    state = {k: v.clone() for k, v in any_model.state_dict().items()}
    compiled = vlmopt.compile(any_model, passes=[vlmopt.passes.RandomPrune(keep_ratio=0.5)])
    with torch.no_grad():
        compiled(**batch)
        compiled.generate(**batch, max_new_tokens=3)
    assert torch.equal(hf_logits(any_model, batch), before)
    assert all(torch.equal(v, state[k]) for k, v in any_model.state_dict().items())


@pytest.mark.parametrize(
    "options",
    [{"feature_layer": [-2, -4]}, {"strategy": "full"}, {"feature_layer": -1}],
    ids=["multi_layer", "full_strategy", "last_layer"],
)
def test_llava_feature_selection_variants(options):
    model = configs.build(llava_config(**options), seed=4)
    batch = padded_batch(model, seed=2)
    with torch.no_grad():
        assert torch.equal(vlmopt.compile(model)(**batch).logits, hf_logits(model, batch))


def test_qwen_mixed_image_sizes_and_video_in_one_batch(qwen):
    specs = [configs.PromptSpec(images=1, text_before=2), configs.PromptSpec(images=2, text_before=5)]
    batch = configs.synthetic_batch(qwen, specs, image_grids=[(8, 8), (4, 12), (12, 8)], video_grids=[(4, 8, 8)], seed=9)
    compiled = vlmopt.compile(qwen)
    with torch.no_grad():
        assert torch.equal(compiled(**batch).logits, hf_logits(qwen, batch))
        expected = qwen.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(compiled.generate(**batch, max_new_tokens=6), expected)


def test_text_only_prompt(any_model):
    batch = configs.synthetic_batch(any_model, [configs.PromptSpec(images=0, text_after=12)], seed=3)
    compiled = vlmopt.compile(any_model, passes=["random_prune:keep_ratio=0.25"])
    with torch.no_grad():
        assert torch.equal(compiled(**batch).logits, hf_logits(any_model, batch))
        expected = any_model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(compiled.generate(**batch, max_new_tokens=6), expected)


def test_mm_token_type_ids_are_derived_when_missing(qwen):
    batch = padded_batch(qwen, seed=4)
    expected = hf_logits(qwen, batch)
    del batch["mm_token_type_ids"]
    with torch.no_grad():
        assert torch.equal(vlmopt.compile(qwen)(**batch).logits, expected)
