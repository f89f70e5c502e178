"""LLaVA-OneVision end to end: bit-exact with HF without a lossy pass (images of different tile counts, a
resampled ``anyres_max`` grid, a multi-image prompt, videos), the layout against HF's own packing, every
pass or its refusal, golden diffs, streams (one-shot equal, HERMES within its budget, the video's newline
outside it), the training graph, the ONNX export and ``vlmopt eval`` of a stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vlmopt
from tests.adapters import family_checks as checks
from tests.adapters import tiled_checks as tiled
from tests.stream.streams import one_shot, random_frames
from vlmopt import configs
from vlmopt.adapters.llava_onevision import llava_onevision_config
from vlmopt.passes import Hermes


@pytest.fixture(scope="module")
def model():
    return configs.build(llava_onevision_config(), seed=31)


@pytest.fixture(scope="module")
def processor():
    return configs.CONFIGS.named("tiny-llava-ov-random").processor()


def images(model, seed=1):
    """Two left-padded rows: a 2×2-tile and a 1×2-tile image; a 4×3-tile image that HF resamples (anyres_max_9)."""
    specs = [configs.PromptSpec(images=2, text_before=3, text_after=5), configs.PromptSpec(images=1, text_before=9, text_after=7)]
    return configs.synthetic_batch(model, specs, image_grids=[(10, 10), (5, 10), (20, 15)], seed=seed)


def video(model, seed=2, frames=4):
    """One row with a video (each frame pooled 2×2, one newline after it), one with text only."""
    specs = [configs.PromptSpec(images=0, text_before=9, text_after=4), configs.PromptSpec(images=0, text_before=3, text_after=6)]
    return configs.synthetic_batch(model, specs, video_grids=[(frames, 5, 5)], seed=seed)


def multi_image(processor, seed=3):
    """The processor's batch of a two-image prompt (base images only, HF's multi-image rule) and a one-image one."""
    rng = np.random.default_rng(seed)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((90, 150), (140, 70), (120, 120))]
    texts = ["<|im_start|>user\n<image>\n<image>\nwhat is left?<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\n<image>\nwhat colour?<|im_end|>\n<|im_start|>assistant\n"]
    return dict(processor(text=texts, images=[pictures[:2], pictures[2:]], return_tensors="pt", padding=True))


# ----- bit-exact without a lossy pass -------------------------------------------------------------
def test_images_equal_hf(model, processor):
    checks.assert_bit_exact(model, images(model))
    batch = multi_image(processor)
    assert batch["batch_num_images"].tolist() == [2, 1]
    checks.assert_bit_exact(model, batch)


def test_video_equals_hf(model):
    checks.assert_bit_exact(model, video(model))


def test_llama_lm_and_clip_tower_equal_hf():
    other = configs.build(llava_onevision_config(tower="clip", text="llama", text_layers=2), seed=32)
    checks.assert_bit_exact(other, images(other, seed=4), max_new_tokens=3)


def test_images_and_video_in_one_batch_are_hf_to_float_tolerance(model):
    """The tower runs once over the batch's tiles and frames (HF: one call each), so the logits agree to
    float tolerance and the greedy tokens exactly."""
    specs = [configs.PromptSpec(images=1, text_before=3), configs.PromptSpec(images=0, text_before=5)]
    batch = configs.synthetic_batch(model, specs, image_grids=[(10, 5)], video_grids=[(3, 5, 5)], seed=5)
    compiled = vlmopt.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch).logits, checks.hf_logits(model, batch), rtol=1e-5, atol=1e-5)
        expected = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(compiled.generate(**batch, max_new_tokens=5), expected)


@pytest.mark.parametrize("make", [images, video], ids=["images", "video"])
def test_layout_follows_hf_packing(model, make):
    tiled.assert_layout_follows_hf_packing(model, make(model, seed=6))


def test_lossless_settings_are_exact(model):
    checks.assert_lossless_settings_are_exact(model, images(model, seed=7))


# ----- every pass ------------------------------------------------------------------------------
def test_every_pass_runs(model, processor):
    checks.run_every_pass(model, images(model, seed=8))
    checks.run_every_pass(model, video(model, seed=9), specs=("hiprune:keep_ratio=1/3", "pool_prune:keep_ratio=0.25", "halfv"))
    checks.run_every_pass(model, multi_image(processor, seed=10), specs=("random_prune:keep_ratio=0.5", "hiprune:keep_ratio=1/3"))


@pytest.mark.parametrize("make", [images, video], ids=["images", "video"])
@pytest.mark.parametrize("spec", ["random_prune:keep_ratio=0.5", "pool_prune:keep_ratio=0.25", "hiprune:keep_ratio=1/3"])
def test_newlines_are_kept_outside_every_budget(model, make, spec):
    tiled.assert_newlines_kept_outside_the_budget(model, make(model, seed=11), spec)


def test_pool_prune_pools_within_each_tile_and_frame(model):
    tiled.assert_pooling_stays_within_each_tile(model, images(model, seed=12))
    tiled.assert_pooling_stays_within_each_tile(model, video(model, seed=13))


@pytest.mark.parametrize("make", [images, video], ids=["images", "video"])
def test_hiprune_scores_the_tower_tokens_each_token_comes_from(model, make):
    tiled.assert_hiprune_reads_each_tile(model, make(model, seed=14))


def test_halfv_span_leaves_the_newlines_out(model):
    tiled.assert_halfv_span_leaves_newlines_out(model, images(model, seed=15))


@pytest.mark.parametrize("spec", ["hiprune:keep_ratio=1/3", "halfv"])
def test_golden_graph_diff(model, golden, spec):
    base = vlmopt.compile(model)
    golden(f"llava_onevision_{spec.split(':')[0]}", vlmopt.graph.diff(base.graph, vlmopt.compile(model, passes=[spec]).graph))


# ----- streams ---------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [(8,), (2, 4, 2)])
def test_stream_equals_one_shot_prefill(model, processor, chunks):
    """The stream's cache after its frames and the question's closing newline holds the one-shot prefill's
    keys and values (to float tolerance: other chunks, other blocking), and both answer with HF's tokens."""
    question = "what colour was the first object to appear?"
    frames = random_frames(sum(chunks), seed=len(chunks))
    compiled = vlmopt.compile(model)
    batch = one_shot(processor, frames, question)
    expected = compiled.generate(**batch, max_new_tokens=6)[0, batch["input_ids"].shape[1] :].tolist()
    with torch.no_grad():
        hf = model.generate(**batch, max_new_tokens=6, do_sample=False)[0, batch["input_ids"].shape[1] :].tolist()
        full = compiled.new_cache()
        compiled.run_stage("prefill", compiled.plan(batch).inputs, full, logits_to_keep=1)
    assert expected == hf
    stream = compiled.stream(processor=processor)
    first = 0
    for count in chunks:
        stream.append(frames[first : first + count])
        first += count
    assert stream.visual_tokens == stream.planner.visual_tokens(frames) == len(frames) * 9
    length = stream.cache_length
    with torch.no_grad():
        assert stream.planner.prelude(stream.state.cache, length) == 1
    for ours, theirs in zip(stream.state.cache.layers, full.layers):
        torch.testing.assert_close(ours.keys, theirs.keys[:, :, : length + 1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values[:, :, : length + 1], rtol=1e-4, atol=1e-5)
    from vlmopt.stream import functions as sf

    sf.truncate_cache(stream.state.cache, length)
    assert stream.ask(question, max_new_tokens=6).token_ids == expected
    assert stream.cache_length == length


def test_hermes_keeps_the_stream_within_its_budget_with_the_paper_curve(model, processor, golden):
    from vlmopt.adapters import adapter_for
    from vlmopt.graph.pipeline import VLMGraph

    assert Hermes().paper_setting(adapter_for(model), "working_schedule", None) == (1.0, -0.9, 20.0, -19.5)
    compiled = vlmopt.compile(model, passes=["hermes:kv_budget=40,chunk_frames=4"])
    before = VLMGraph.capture(adapter_for(model), chunk=True)["chunk"]
    golden("llava_onevision_hermes_chunk", vlmopt.graph.diff(before, compiled.graph["chunk"]))
    stream = compiled.stream(processor=processor)
    frames = random_frames(16, seed=16)
    for first in range(0, 16, 4):
        stream.append(frames[first : first + 4])
        assert stream.cache_length <= 40
    answer = stream.ask("what is there?", max_new_tokens=3)
    assert len(answer.token_ids) >= 1 and answer.cache_tokens == stream.cache_length <= 40
    assert len(set(stream.kv_bytes_per_chunk[1:])) == 1, "memory stays flat once the budget is reached"


@pytest.mark.parametrize("spec", ["streaming_llm:kv_budget=30,chunk_frames=4", "snapkv:kv_budget=30,chunk_frames=4",
                                  "frame_subsample:keep_ratio=0.5,chunk_frames=4"])
def test_stream_baselines_run(model, processor, spec):
    stream = vlmopt.compile(model, passes=[spec]).stream(processor=processor)
    stream.append(random_frames(8, seed=17))
    assert stream.visual_tokens <= 8 * 9 and len(stream.ask("what is there?", max_new_tokens=2).token_ids) >= 1


def test_eval_of_a_stream_on_the_random_config():
    from vlmopt.cli import main

    argv = ["eval", "--model", "tiny-llava-ov-random", "--task", "shapes-video", "--passes", "hermes", "--stream-budget", "0.32",
            "--n", "2", "--batch-size", "2"]
    assert main(argv) == 0


# ----- training, export -------------------------------------------------------------------------
@pytest.mark.parametrize("make", [images, video], ids=["images", "video"])
def test_training_loss_equals_hf(model, make):
    checks.assert_training_loss_equals_hf(model, make(model, seed=18))


def test_export_round_trip_with_hiprune_and_halfv(model, processor, tmp_path):
    pytest.importorskip("onnxruntime")
    tiled.assert_export_round_trip(model, processor, tmp_path)
