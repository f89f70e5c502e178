"""LLaVA-NeXT end to end: bit-exact with HF without a lossy pass (left-padded rows of images with different
tile counts, CLIP and SigLIP towers, Llama / Mistral / Qwen2 LMs), the layout against HF's own packing,
every pass (newlines outside every budget, pooling within each tile, HiPrune per tile, HalfV's span
without newlines) or its refusal, golden diffs, the training graph and the ONNX export."""

from __future__ import annotations

import pytest
import torch

import vlmopt
from tests.adapters import family_checks as checks
from tests.adapters import tiled_checks as tiled
from vlmopt import configs
from vlmopt.adapters import adapter_for
from vlmopt.adapters.llava_next import llava_next_config
from vlmopt.errors import IncompatiblePassError, InputError, UnsupportedModelError


@pytest.fixture(scope="module")
def model():
    return configs.build(llava_next_config(), seed=21)


def images(model, seed=1):
    """Two left-padded rows: a 2×2-tile image and a 1×2-tile one; an image whose tiles the unpadding crops."""
    specs = [configs.PromptSpec(images=2, text_before=3, text_after=5), configs.PromptSpec(images=1, text_before=9, text_after=7)]
    return configs.synthetic_batch(model, specs, image_grids=[(8, 8), (4, 8), (7, 12)], seed=seed)


# ----- bit-exact without a lossy pass -------------------------------------------------------------
def test_logits_and_greedy_tokens_equal_hf(model):
    batch = images(model)
    assert (batch["attention_mask"] == 0).any() and batch["pixel_values"].shape[:2] == (3, 5)
    checks.assert_bit_exact(model, batch)
    single = configs.synthetic_batch(model, [configs.PromptSpec(images=1, text_before=4)], image_grids=[(12, 4)], seed=3)
    checks.assert_bit_exact(model, single)


@pytest.mark.parametrize("tower,text", [("siglip", "mistral"), ("clip", "qwen2")])
def test_other_towers_and_language_models_equal_hf(tower, text):
    other = configs.build(llava_next_config(tower=tower, text=text, text_layers=2), seed=22)
    checks.assert_bit_exact(other, images(other, seed=2), max_new_tokens=3)


def test_clip_with_the_full_strategy_is_refused_as_hf_fails():
    model = configs.build(llava_next_config(strategy="full", text_layers=1, vision_layers=2), seed=23)
    with pytest.raises(UnsupportedModelError, match="CLS included, into the tile grid"):
        vlmopt.compile(model)
    batch = images(configs.build(llava_next_config(text_layers=1, vision_layers=2), seed=23))
    with pytest.raises(RuntimeError), torch.no_grad():
        model(**batch)


def test_layout_follows_hf_packing(model):
    tiled.assert_layout_follows_hf_packing(model, images(model, seed=4))


def test_lossless_settings_are_exact(model):
    checks.assert_lossless_settings_are_exact(model, images(model, seed=5))


def test_inputs_that_do_not_fit_get_clear_errors(model):
    batch = images(model, seed=6)
    with pytest.raises(InputError, match="need image_sizes"):
        vlmopt.compile(model)(**{k: v for k, v in batch.items() if k != "image_sizes"})
    wrong = dict(batch, image_sizes=batch["image_sizes"].flip(1))
    with pytest.raises(InputError, match="image_grid_pinpoints and tile size must be the model's"):
        vlmopt.compile(model)(**wrong)


# ----- every pass ------------------------------------------------------------------------------
def test_every_pass_runs_or_is_refused_with_its_reason(model):
    checks.run_every_pass(model, images(model, seed=7))
    for spec in ("hermes", "streaming_llm", "snapkv", "frame_subsample:keep_ratio=0.5"):
        with pytest.raises(IncompatiblePassError, match="stream: frames streamed into a filled KV cache"):
            vlmopt.compile(model, passes=[spec])
    with pytest.raises(UnsupportedModelError, match="tiles are packed together"):
        adapter_for(model).frame_tokens(vlmopt.compile(model).plan(images(model)))


@pytest.mark.parametrize("spec", ["random_prune:keep_ratio=0.5", "pool_prune:keep_ratio=0.25", "hiprune:keep_ratio=1/3"])
def test_newlines_are_kept_outside_every_budget(model, spec):
    tiled.assert_newlines_kept_outside_the_budget(model, images(model, seed=8), spec)


def test_pool_prune_pools_within_each_tile(model):
    tiled.assert_pooling_stays_within_each_tile(model, images(model, seed=9))


def test_hiprune_scores_each_tile_s_own_tower_tokens(model):
    tiled.assert_hiprune_reads_each_tile(model, images(model, seed=10))


def test_halfv_span_leaves_the_newlines_out(model):
    tiled.assert_halfv_span_leaves_newlines_out(model, images(model, seed=11))


@pytest.mark.parametrize("spec", ["hiprune:keep_ratio=1/3", "halfv", "pool_prune:keep_ratio=0.25"])
def test_golden_graph_diff(model, golden, spec):
    base = vlmopt.compile(model)
    golden(f"llava_next_{spec.split(':')[0]}", vlmopt.graph.diff(base.graph, vlmopt.compile(model, passes=[spec]).graph))


def test_pruning_lowers_the_llm_flops(model):
    """A 3×1-tile image (64 grid tokens, 16 newlines) after a short question: HiPrune at 1/3 and HalfV's
    defaults (the paper's LLaVA-NeXT schedule, layer inactivity) both cut the LLM's prefill FLOPs."""
    batch = configs.synthetic_batch(model, [configs.PromptSpec(images=1, text_before=4, text_after=8)], image_grids=[(12, 4)], seed=12)
    hiprune = checks.llm_flops_ratio(model, batch, "hiprune:keep_ratio=1/3")
    halfv = checks.llm_flops_ratio(model, batch, "halfv")
    both = checks.llm_flops_ratio(model, batch, "hiprune:keep_ratio=1/3+halfv")
    assert hiprune < 0.6 and halfv < 0.8 and both < min(hiprune, halfv)


# ----- training, export -------------------------------------------------------------------------
def test_training_loss_equals_hf(model):
    checks.assert_training_loss_equals_hf(model, images(model, seed=13))


def test_regate_runs_on_the_training_graph(model):
    from tests.train.train_helpers import random_labels

    batch = images(model, seed=14)
    compiled = vlmopt.compile(model, passes=["regate:keep=0.5,warmup_steps=0,dense_steps=0"], mode="train")
    with pytest.warns(UserWarning, match="no teacher_losses"):
        out = compiled(**batch, labels=random_labels(batch, seed=15), sample_ids=[0, 1])
    assert out.active_tokens.sum() < (random_labels(batch, seed=15)[:, 1:] != -100).sum()


def test_export_round_trip_with_hiprune_and_halfv(model, tmp_path):
    pytest.importorskip("onnxruntime")
    tiled.assert_export_round_trip(model, configs.CONFIGS.named("tiny-llava-next-random").processor(), tmp_path)
