"""InternVL end to end (InternVL3.5 with a Qwen3 LM and q/k-normed InternViT, InternVL3 with a Qwen2 LM):
bit-exact with HF for tiled images and videos as frames, every pass, HiPrune's score over the 2×2
pixel-shuffled patches, the processor's tiles and video prompt, streams, the training graph, export
and the command line."""

from __future__ import annotations

import pytest
import torch

import vlmopt
from tests.adapters import family_checks as checks
from tests.stream.streams import one_shot, random_frames
from vlmopt import configs
from vlmopt.adapters.internvl import internvl_config
from vlmopt.graph.probe import run_with_probes
from vlmopt.reference import processing


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def model(request):
    return configs.build(internvl_config(lm=request.param, qk_norm=request.param == "qwen3", text_layers=4), seed=41)


@pytest.fixture(scope="module")
def dense():
    return configs.build(internvl_config(text_layers=4), seed=42)


def images(model, seed=1):
    """Two left-padded rows: a one-tile image and a 1×2-tile image (two crops and the thumbnail), and
    a 2×2-tile image (five tiles) after longer text."""
    specs = [configs.PromptSpec(images=2, text_before=3, text_after=5), configs.PromptSpec(images=1, text_before=9, text_after=7)]
    return configs.synthetic_batch(model, specs, image_grids=[(1, 1), (1, 2), (2, 2)], seed=seed)


def video(model, seed=2):
    """One row with a video of 4 frames (``Frame{i}: <img>…</img>``), one with text only."""
    specs = [configs.PromptSpec(images=0, text_before=9, text_after=4), configs.PromptSpec(images=0, text_before=3, text_after=6)]
    return configs.synthetic_batch(model, specs, video_grids=[(4, 0, 0)], seed=seed)


# ----- bit-exact without a lossy pass -------------------------------------------------------------
@pytest.mark.parametrize("make", [images, video], ids=["images", "video"])
def test_logits_and_greedy_tokens_equal_hf(model, make):
    batch = make(model)
    assert (batch["attention_mask"] == 0).any()
    checks.assert_bit_exact(model, batch)


def test_lossless_settings_are_exact(dense):
    checks.assert_lossless_settings_are_exact(dense, images(dense, seed=4))


# ----- every pass ------------------------------------------------------------------------------
def test_every_pass_runs(model):
    checks.run_every_pass(model, images(model, seed=6))


@pytest.mark.parametrize("spec", ["hiprune:keep_ratio=1/3", "halfv"])
def test_golden_graph_diff(dense, golden, spec):
    base = vlmopt.compile(dense)
    golden(f"internvl_{spec.split(':')[0]}", vlmopt.graph.diff(base.graph, vlmopt.compile(dense, passes=[spec]).graph))


def test_hiprune_scores_are_the_towers_attention_over_pixel_shuffled_patches(dense):
    """Each tile's score per LLM token is the attention its 2×2 patches receive in the block (mean over
    heads and every query, CLS included; the CLS column left out), averaged over the four patches."""
    batch = images(dense, seed=7)
    compiled = vlmopt.compile(dense, passes=["hiprune:keep_ratio=1/3,object_layer=1,deep_layer=3"])
    prompt = compiled.plan(batch)
    names = {"vision_1_received", "vision_3_received"}
    _, values = run_with_probes(compiled.stages["prefill"], dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=0),
                                lambda n: n.name in names)
    dense.set_attn_implementation({"vision_config": "eager", "text_config": "sdpa"})
    try:
        with torch.no_grad():
            attentions = dense.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    finally:
        dense.set_attn_implementation({"vision_config": "sdpa", "text_config": "sdpa"})
    grid = compiled.adapter.tile_grid
    for block in (1, 3):
        expected = checks.merged_scores(attentions[block], 1, grid, 2)
        torch.testing.assert_close(values[f"vision_{block}_received"], expected, rtol=1e-5, atol=1e-7)


def test_pruning_lowers_the_llm_flops(dense):
    batch = configs.synthetic_batch(dense, [configs.PromptSpec(images=1, text_before=4, text_after=8)], image_grids=[(2, 2)], seed=9)
    hiprune = checks.llm_flops_ratio(dense, batch, "hiprune:keep_ratio=1/3")
    halfv = checks.llm_flops_ratio(dense, batch, "halfv")
    assert hiprune < 0.6 and halfv < 0.8 and checks.llm_flops_ratio(dense, batch, "hiprune:keep_ratio=1/3+halfv") < hiprune


# ----- the processor, streams ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def processor():
    return processing.build_processor("internvl", 112, 112)


def test_processor_tiles_and_video_prompt_are_hfs(processor):
    """A 1×2-tile picture gives two crops and the thumbnail, each 16 ``<IMG_CONTEXT>`` inside one
    ``<img>…</img>``; a video's prompt is what ``InternVLProcessor.replace_video_token`` writes."""
    import numpy as np
    from PIL import Image

    tokenizer = processor.tokenizer
    wide = Image.fromarray(np.random.default_rng(3).integers(0, 256, (112, 224, 3), dtype=np.uint8))
    out = processor(text=[processing.prompt("internvl", "what is it?")], images=[wide], return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert out["pixel_values"].shape == (3, 3, 112, 112)
    assert ids.count(tokenizer.context_image_token_id) == 48 and ids.count(tokenizer.start_image_token_id) == 1
    frames = random_frames(3, seed=4, size=112)
    batch = one_shot(processor, frames, "what moved?")
    expected = processor.replace_video_token({"pixel_values_videos": [torch.zeros(3)]}, 0)
    text = processing.prompt("internvl", "what moved?", video=True).replace("<video>", expected)
    assert batch["input_ids"][0].tolist() == tokenizer(text)["input_ids"]
    assert batch["pixel_values"].shape == (3, 3, 112, 112)


@pytest.mark.parametrize("chunks", [(5,), (2, 2, 1)])
def test_stream_equals_one_shot_prefill(dense, processor, chunks):
    question = "what colour was the first object to appear?"
    frames = random_frames(sum(chunks), seed=len(chunks), size=112)
    compiled = vlmopt.compile(dense)
    batch = one_shot(processor, frames, question)
    expected = compiled.generate(**batch, max_new_tokens=6)[0, batch["input_ids"].shape[1] :].tolist()
    with torch.no_grad():
        assert dense.generate(**batch, max_new_tokens=6, do_sample=False)[0, batch["input_ids"].shape[1] :].tolist() == expected
    stream = compiled.stream(processor=processor)
    first = 0
    for count in chunks:
        stream.append(frames[first : first + count])
        first += count
    assert stream.ask(question, max_new_tokens=6).token_ids == expected


def test_hermes_keeps_the_stream_within_its_budget(dense, processor):
    compiled = vlmopt.compile(dense, passes=["hermes:kv_budget=40,chunk_frames=2"])
    stream = compiled.stream(processor=processor)
    frames = random_frames(8, seed=11, size=112)
    for first in range(0, 8, 2):
        stream.append(frames[first : first + 2])
        assert stream.cache_length <= 40
    assert len(stream.ask("what is there?", max_new_tokens=3).token_ids) >= 1
    assert len(set(stream.kv_bytes_per_chunk)) == 1, "memory stays flat once the budget is reached"


# ----- training, export, hosts, command line -----------------------------------------------------
def test_training_loss_equals_hf(model):
    checks.assert_training_loss_equals_hf(model, images(model, seed=12))


def test_regate_training_loss_equals_hf(dense):
    checks.assert_regate_loss_equals_hf(dense, images(dense, seed=14))


@pytest.mark.slow
def test_export_round_trip_with_hiprune(processor, tmp_path):
    pytest.importorskip("onnxruntime")
    model = configs.build(configs.CONFIGS["tiny-internvl-random"](), seed=43)
    checks.assert_export_round_trip(model, processor, tmp_path, (112, 112))
    # `vlmopt run` loads the processor saved beside the graphs
    checks.run_cli("run", str(tmp_path), "--image", str(tmp_path / "picture.png"), "--prompt", "what is it?", "--max-new-tokens", "2")


@pytest.mark.slow
def test_apbv_under_two_gloo_ranks_matches_the_simulation(tmp_path):
    from tests.distributed.apbv_worker import SETTINGS, run, tiny_model, video_prompt
    from tests.distributed.test_apbv_group import launch
    from vlmopt.passes import APBV

    model = tiny_model("internvl")
    compiled = vlmopt.compile(model, passes=[APBV(hosts=2, **SETTINGS)])
    expected_logits, expected_tokens, _ = run(compiled, video_prompt(model, frames=4))
    results, _ = launch(tmp_path, 2, frames=4, family="internvl")
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
        torch.testing.assert_close(result["logits"], expected_logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(result["tokens"], expected_tokens)


def test_command_line_takes_the_random_config(tmp_path):
    name = "tiny-internvl-random"
    assert "hiprune_select" in checks.run_cli("diff", "--model", name, "--passes", "hiprune:keep_ratio=1/3")
    assert "| hiprune:keep_ratio=1/3 |" in checks.run_cli("bench", "--config", name, "--repeats", "1", "--passes", "hiprune:keep_ratio=1/3")
    assert "| (none) |" in checks.run_cli("eval", "--model", name, "--task", "shapes", "--n", "2", "--passes", "pool_prune:keep_ratio=0.25")
    checks.run_cli("viz", "--model", name, "--passes", "hiprune:keep_ratio=1/3", "--out", str(tmp_path / "kept.png"))
    assert (tmp_path / "kept.png").read_bytes()[:4] == b"\x89PNG"
