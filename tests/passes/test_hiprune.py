"""HiPrune: scores equal the model's own attention, selection invariants, exactness, defaults, errors."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

import vlmopt
from tests.conftest import eager_vision_attentions, padded_batch, row
from vlmopt import configs
from vlmopt.graph.probe import run_with_probes
from vlmopt.ops.hiprune_select import ANCHOR, BUFFER, REGISTER
from vlmopt.passes import HiPrune
from vlmopt.adapters.llava import llava_15_7b_shape, llava_config
from vlmopt.adapters.qwen2_5_vl import qwen25vl_7b_shape, qwen25vl_config


def probe(compiled, batch, names):
    prompt = compiled.plan(batch)
    inputs = dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=0)
    _, values = run_with_probes(compiled.stages["prefill"], inputs, lambda n: n.name in names)
    return prompt, values


def test_llava_scores_are_the_eager_attention_column_means():
    model = configs.build(llava_config(vision_layers=6), seed=5)
    batch = padded_batch(model, seed=1)
    compiled = vlmopt.compile(model, passes=[HiPrune(keep_ratio=0.5, object_layer=1, deep_layer=4)])
    _, values = probe(compiled, batch, {"vision_1_received", "vision_4_received"})
    attentions = eager_vision_attentions(model, batch["pixel_values"])
    for layer in (1, 4):
        expected = attentions[layer].mean(dim=(1, 2))[:, 1:].reshape(-1)  # over heads and queries, CLS column left out
        torch.testing.assert_close(values[f"vision_{layer}_received"], expected, rtol=1e-5, atol=1e-7)


def test_qwen_scores_are_dense_per_image_in_full_attention_blocks():
    model = configs.build(qwen25vl_config(vision_depth=4, full_attention_blocks=(1, 3)), seed=6)
    batch = configs.synthetic_batch(model, [configs.PromptSpec(images=2)], image_grids=[(8, 8), (4, 12)], seed=2)
    compiled = vlmopt.compile(model, passes=[HiPrune(keep_ratio=0.5, object_layer=1, deep_layer=3)])
    prompt, values = probe(compiled, batch, {"vision_1_received"})
    recorded = []

    def record(module, query, key, value, attention_mask, **kwargs):
        out, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        recorded.append(weights.detach())
        return out, weights

    AttentionInterface.register("vlmopt_test_record", record)
    model.set_attn_implementation({"vision_config": "vlmopt_test_record", "text_config": "sdpa"})
    try:
        with torch.no_grad():
            model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    finally:
        model.set_attn_implementation({"vision_config": "sdpa", "text_config": "sdpa"})
    # Block 0 attends within windows (one call each); block 1 over whole images (one call each).
    windows = prompt.inputs["cu_window_seqlens"].numel() - 1
    images = prompt.inputs["cu_seqlens"].numel() - 1
    assert len(recorded) == 2 * windows + 2 * images
    block_one = recorded[windows : windows + images]
    patch_scores = torch.cat([weights[0].mean(dim=(0, 1)) for weights in block_one])
    expected = patch_scores.reshape(-1, 4).mean(-1)  # one score per merged token, window order
    torch.testing.assert_close(values["vision_1_received"], expected, rtol=1e-5, atol=1e-7)


def test_selection_and_kinds(family_model):
    batch = padded_batch(family_model, seed=3)
    compiled = vlmopt.compile(family_model, passes=[HiPrune(keep_ratio=0.75, alpha=0.5)])
    prompt, values = probe(compiled, batch, {"keep", "token_kinds"})
    keep, kinds = values["keep"], values["token_kinds"]
    per_input = [int(0.75 * c + 0.5) for c in prompt.layout.counts]
    assert keep.numel() == sum(per_input)
    start = 0
    for budget in per_input:
        assert (kinds[start : start + budget] == ANCHOR).sum() == int(0.5 * budget / 5 + 0.5)
        assert (kinds[start : start + budget] == BUFFER).sum() > 0
        start += budget
    assert set(kinds.tolist()) <= {ANCHOR, BUFFER, REGISTER}


def test_keep_ratio_one_is_exact(family_model):
    batch = padded_batch(family_model, seed=4)
    with torch.no_grad():
        expected = family_model(**batch).logits
        got = vlmopt.compile(family_model, passes=["hiprune:keep_ratio=1.0"])(**batch).logits
    assert torch.equal(got, expected)


def test_batch_equals_rows_alone(family_model):
    batch = padded_batch(family_model, seed=5)
    compiled = vlmopt.compile(family_model, passes=["hiprune:keep_ratio=1/3"])
    tokens = compiled.generate(**batch, max_new_tokens=5)
    prompt, batched = probe(compiled, batch, {"keep"})
    seq_len = batch["input_ids"].shape[1]
    kept_offset = 0
    for b in range(2):
        single = row(batch, b)
        _, alone = probe(compiled, single, {"keep"})
        count = alone["keep"].numel()
        token_offset = sum(prompt.layout.counts[:b])
        assert torch.equal(batched["keep"][kept_offset : kept_offset + count] - token_offset, alone["keep"])
        kept_offset += count
        alone_tokens = compiled.generate(**single, max_new_tokens=5)
        assert torch.equal(tokens[b, seq_len:], alone_tokens[0, single["input_ids"].shape[1] :])


def test_golden_graph_diff(family_model, golden):
    base = vlmopt.compile(family_model)
    compiled = vlmopt.compile(family_model, passes=["hiprune:keep_ratio=1/3"])
    golden(f"hiprune_{base.adapter.family}", vlmopt.graph.diff(base.graph, compiled.graph))


def test_paper_default_layers_scale_with_depth():
    llava = vlmopt.compile(configs.build(llava_15_7b_shape(), device="meta"))
    qwen = vlmopt.compile(configs.build(qwen25vl_7b_shape(), device="meta"))
    assert HiPrune(keep_ratio=0.33).layers(llava.adapter) == (8, 22)
    assert HiPrune(keep_ratio=0.33).layers(qwen.adapter) == (15, 31)
    small = vlmopt.compile(configs.build(llava_config(vision_layers=8)))
    assert HiPrune(keep_ratio=0.33).layers(small.adapter) == (2, 6)


def test_refusals(llava_clip):
    with pytest.raises(vlmopt.IncompatiblePassError, match="must come before RandomPrune"):
        vlmopt.compile(llava_clip, passes=["random_prune:keep_ratio=0.5", "hiprune:keep_ratio=0.5"])
    with pytest.raises(vlmopt.IncompatiblePassError, match="object_layer=40"):
        vlmopt.compile(llava_clip, passes=["hiprune:keep_ratio=0.5,object_layer=40"])
    with pytest.raises(vlmopt.PassConfigError, match=r"alpha must be in \(0, 1\]"):
        HiPrune(keep_ratio=0.5, alpha=0)


def test_text_only_prompt_is_untouched(family_model):
    batch = configs.synthetic_batch(family_model, [configs.PromptSpec(images=0, text_after=10)], seed=6)
    with torch.no_grad():
        expected = family_model(**batch).logits
        got = vlmopt.compile(family_model, passes=["hiprune:keep_ratio=0.2"])(**batch).logits
    assert torch.equal(got, expected)
