"""Gemma 3 end to end: bit-exact with HF (bidirectional attention inside each image from
``token_type_ids``, sliding-window and global layers with their own rotary embeddings, q/k norms and
``query_pre_attn_scalar``), the masks equal HF's, kept image tokens still attend each other both ways
after pruning, every pass run or refused with its reason, HiPrune's score over the pooled patches, the
training graph and the command line."""

from __future__ import annotations

import pytest
import torch

import vlmopt
from tests.adapters import family_checks as checks
from vlmopt import configs
from vlmopt.adapters.gemma3 import gemma3_config
from vlmopt.errors import IncompatiblePassError
from vlmopt.graph.probe import run_with_probes


@pytest.fixture(scope="module")
def model():
    return configs.build(gemma3_config(), seed=51)


def images(model, seed=1):
    """Two left-padded rows: an image and an image with two pan-and-scan crops, and an image with one
    crop after longer text (the sliding window, 8 tokens, is shorter than an image's 16)."""
    specs = [configs.PromptSpec(images=2, text_before=3, text_after=5), configs.PromptSpec(images=1, text_before=9, text_after=7)]
    return configs.synthetic_batch(model, specs, image_grids=[None, (2,), (1,)], seed=seed)


def probe(compiled, batch, wanted):
    prompt = compiled.plan(batch)
    _, values = run_with_probes(compiled.stages[prompt.stage], dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=0),
                                lambda n: n.name in wanted)
    return prompt, values


# ----- bit-exact without a lossy pass -------------------------------------------------------------
def test_logits_and_greedy_tokens_equal_hf(model):
    batch = images(model)
    assert (batch["attention_mask"] == 0).any() and batch["token_type_ids"].any()
    checks.assert_bit_exact(model, batch)
    single = configs.synthetic_batch(model, [configs.PromptSpec(images=1, text_before=4)], seed=3)
    checks.assert_bit_exact(model, single)


def test_text_prompts_with_and_without_token_types_equal_hf(model):
    """With ``token_type_ids`` (all text) HF materialises the masks from the block ids; without them it
    builds the plain ones: both equal HF's."""
    batch = configs.synthetic_batch(model, [configs.PromptSpec(images=0, text_before=6), configs.PromptSpec(images=0, text_before=11)], seed=4)
    batch.pop("token_type_ids", None)
    checks.assert_bit_exact(model, batch)
    checks.assert_bit_exact(model, dict(batch, token_type_ids=torch.zeros_like(batch["input_ids"])))


def test_masks_are_hfs_with_each_image_bidirectional(model):
    """The graph's two masks equal HF's ``create_masks_for_vision_model`` on the same inputs."""
    from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

    batch = images(model, seed=5)
    compiled = vlmopt.compile(model)
    prompt, values = probe(compiled, batch, {"causal_mask", "sliding_mask", "merge_visual"})
    expected = create_masks_for_vision_model(
        config=model.config.get_text_config(), inputs_embeds=values["merge_visual"], attention_mask=batch["attention_mask"],
        cache=compiled.new_cache(), position_ids=prompt.inputs["position_ids"],
        block_sequence_ids=get_block_sequence_ids_for_mask(batch["token_type_ids"]),
    )
    assert torch.equal(values["causal_mask"], expected["full_attention"])
    assert torch.equal(values["sliding_mask"], expected["sliding_attention"])
    image = batch["token_type_ids"][1].nonzero()[0].item()
    assert values["causal_mask"][1, 0, image, image + 5] and not values["causal_mask"][1, 0, image - 1, image]


def test_pruned_image_tokens_still_attend_each_other_both_ways(model):
    """After RandomPrune the LLM equals HF's Gemma 3 LM run on the kept embeddings, positions and token
    types: the block ids were gathered with the sequence."""
    batch = images(model, seed=6)
    compiled = vlmopt.compile(model, passes=["random_prune:keep_ratio=0.5"])
    names = {"merge_visual_kept", "attention_mask_kept", "position_ids_kept", "block_sequence_ids_kept"}
    prompt, values = probe(compiled, batch, names)
    with torch.no_grad():
        ours = compiled(**batch).logits
        hidden = model.model(
            inputs_embeds=values["merge_visual_kept"], attention_mask=values["attention_mask_kept"],
            position_ids=values["position_ids_kept"], token_type_ids=(values["block_sequence_ids_kept"] >= 0).long(),
        ).last_hidden_state
    real = values["attention_mask_kept"].bool()  # padding slots attend to nothing real in either
    assert ours.shape[1] < batch["input_ids"].shape[1]
    torch.testing.assert_close(ours[real], model.lm_head(hidden)[real], rtol=1e-5, atol=1e-5)


def test_lossless_settings_are_exact(model):
    checks.assert_lossless_settings_are_exact(model, images(model, seed=7))


# ----- every pass ------------------------------------------------------------------------------
def test_every_pass_runs_or_is_refused_with_its_reason(model):
    batch = images(model, seed=8)
    checks.run_every_pass(model, batch, specs=[s for s in checks.PASS_SPECS if not s.startswith("apbv")])
    with pytest.raises(IncompatiblePassError, match="sliding-window layers"):
        vlmopt.compile(model, passes=["apbv:hosts=2"])
    with pytest.raises(IncompatiblePassError, match="there is no video to stream"):
        vlmopt.compile(model, passes=["hermes:kv_budget=40"])


@pytest.mark.parametrize("spec", ["hiprune:keep_ratio=1/3", "halfv"])
def test_golden_graph_diff(model, golden, spec):
    base = vlmopt.compile(model)
    golden(f"gemma3_{spec.split(':')[0]}", vlmopt.graph.diff(base.graph, vlmopt.compile(model, passes=[spec]).graph))


def test_hiprune_scores_are_the_towers_attention_over_pooled_patches(model):
    batch = images(model, seed=9)
    compiled = vlmopt.compile(model, passes=["hiprune:keep_ratio=1/3,object_layer=1,deep_layer=3"])
    _, values = probe(compiled, batch, {"vision_1_received", "vision_3_received"})
    model.set_attn_implementation({"vision_config": "eager", "text_config": "sdpa"})
    try:
        with torch.no_grad():
            attentions = model.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"vision_config": "sdpa", "text_config": "sdpa"})
    for block in (1, 3):
        expected = checks.merged_scores(attentions[block], 0, compiled.adapter.tile_grid, compiled.adapter.merge)
        torch.testing.assert_close(values[f"vision_{block}_received"], expected, rtol=1e-5, atol=1e-7)


def test_pruning_lowers_the_llm_flops(model):
    batch = configs.synthetic_batch(model, [configs.PromptSpec(images=1, text_before=4, text_after=8)], image_grids=[(3,)], seed=10)
    hiprune = checks.llm_flops_ratio(model, batch, "hiprune:keep_ratio=1/3")
    assert hiprune < 0.6 and checks.llm_flops_ratio(model, batch, "hiprune:keep_ratio=1/3+halfv") < hiprune


# ----- training, export, command line ------------------------------------------------------------
def test_training_loss_equals_hf(model):
    checks.assert_training_loss_equals_hf(model, images(model, seed=11))


def test_regate_training_loss_equals_hf(model):
    checks.assert_regate_loss_equals_hf(model, images(model, seed=14))


def test_regate_with_elision_runs_on_the_training_graph(model):
    """Elision gathers each layer's own rotary embedding and the block ids its masks read."""
    from tests.train.train_helpers import random_labels

    batch = images(model, seed=12)
    labels = random_labels(batch, seed=13)
    compiled = vlmopt.compile(model, passes=["regate:keep=0.5,warmup_steps=0,dense_steps=0,elide=True"], mode="train")
    with pytest.warns(UserWarning, match="no teacher_losses"):
        out = compiled(**batch, labels=labels, sample_ids=[0, 1])
    assert torch.isfinite(out.loss) and out.active_tokens.sum() < (labels[:, 1:] != -100).sum()


def test_export_round_trip_with_hiprune(model, tmp_path):
    """The prefill graph takes the image blocks planned from the image tokens; the sliding layers' past
    is full length, their window applied by the mask; onnxruntime gives the compiled model's tokens."""
    pytest.importorskip("onnxruntime")
    from vlmopt.export.manifest import read_manifest
    from vlmopt.reference.processing import build_processor

    processor = build_processor("gemma3", 112, 112)
    checks.assert_export_round_trip(model, processor, tmp_path, (150, 90))
    manifest = read_manifest(tmp_path)
    assert manifest["layout"]["sequence_inputs"] == {"block_sequence_ids": "image_blocks"}
    assert "block_sequence_ids" in [i["name"] for i in manifest["graphs"]["prefill"]["inputs"]]


def test_command_line_takes_the_random_config(tmp_path):
    name = "tiny-gemma3-random"
    assert "| hiprune:keep_ratio=1/3 |" in checks.run_cli("bench", "--config", name, "--repeats", "1", "--passes", "hiprune:keep_ratio=1/3")
    assert "| (none) |" in checks.run_cli("eval", "--model", name, "--task", "shapes", "--n", "2", "--passes", "hiprune:keep_ratio=1/3")
    checks.run_cli("viz", "--model", name, "--passes", "hiprune:keep_ratio=1/3", "--out", str(tmp_path / "kept.png"))
    assert (tmp_path / "kept.png").read_bytes()[:4] == b"\x89PNG"
