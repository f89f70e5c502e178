"""SmolVLM end to end: bit-exact with HF for split images (rows × columns of tiles and the global image,
padded with all-zero images) and videos as frames, every pass, HiPrune's score over the 3×3
pixel-shuffled patches, the processor's row / column tokens and video prompt, streams, the training
graph, export and the command line."""

from __future__ import annotations

import pytest
import torch

import vlmopt
from tests.adapters import family_checks as checks
from tests.stream.streams import one_shot, random_frames
from vlmopt import configs
from vlmopt.adapters.smolvlm import number_words, smolvlm_config
from vlmopt.graph.probe import run_with_probes
from vlmopt.reference import processing


@pytest.fixture(scope="module")
def model():
    return configs.build(smolvlm_config(text_layers=4), seed=61)


def images(model, seed=1):
    """Two left-padded rows: the global image alone and a 1×2 split (three tiles), and a 2×2 split (five
    tiles) after longer text; the first row's images are padded with two all-zero ones."""
    specs = [configs.PromptSpec(images=2, text_before=3, text_after=5), configs.PromptSpec(images=1, text_before=9, text_after=7)]
    return configs.synthetic_batch(model, specs, image_grids=[None, (1, 2), (2, 2)], seed=seed)


def video(model, seed=2):
    specs = [configs.PromptSpec(images=0, text_before=9, text_after=4), configs.PromptSpec(images=0, text_before=3, text_after=6)]
    return configs.synthetic_batch(model, specs, video_grids=[(4, 0, 0)], seed=seed)


# ----- bit-exact without a lossy pass -------------------------------------------------------------
@pytest.mark.parametrize("make", [images, video], ids=["images", "video"])
def test_logits_and_greedy_tokens_equal_hf(model, make):
    batch = make(model)
    assert (batch["attention_mask"] == 0).any() and (batch["pixel_values"] == 0).all(dim=(2, 3, 4)).any()
    checks.assert_bit_exact(model, batch)


def test_lossless_settings_are_exact(model):
    checks.assert_lossless_settings_are_exact(model, images(model, seed=4))


# ----- every pass ------------------------------------------------------------------------------
def test_every_pass_runs(model):
    checks.run_every_pass(model, images(model, seed=6))


@pytest.mark.parametrize("spec", ["hiprune:keep_ratio=1/3", "halfv"])
def test_golden_graph_diff(model, golden, spec):
    base = vlmopt.compile(model)
    golden(f"smolvlm_{spec.split(':')[0]}", vlmopt.graph.diff(base.graph, vlmopt.compile(model, passes=[spec]).graph))


def test_hiprune_scores_are_the_towers_attention_over_pixel_shuffled_patches(model):
    batch = images(model, seed=7)
    compiled = vlmopt.compile(model, passes=["hiprune:keep_ratio=1/3,object_layer=1,deep_layer=3"])
    prompt = compiled.plan(batch)
    names = {"vision_1_received", "vision_3_received"}
    _, values = run_with_probes(compiled.stages["prefill"], dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=0),
                                lambda n: n.name in names)
    model.set_attn_implementation({"vision_config": "eager", "text_config": "sdpa"})
    try:
        with torch.no_grad():
            attentions = model.model.vision_model(prompt.inputs["pixel_values"], output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"vision_config": "sdpa", "text_config": "sdpa"})
    for block in (1, 3):
        expected = checks.merged_scores(attentions[block], 0, compiled.adapter.tile_grid, 3)
        torch.testing.assert_close(values[f"vision_{block}_received"], expected, rtol=1e-5, atol=1e-7)


def test_pruning_lowers_the_llm_flops(model):
    batch = configs.synthetic_batch(model, [configs.PromptSpec(images=1, text_before=4, text_after=8)], image_grids=[(2, 2)], seed=9)
    hiprune = checks.llm_flops_ratio(model, batch, "hiprune:keep_ratio=1/3")
    assert hiprune < 0.7 and checks.llm_flops_ratio(model, batch, "hiprune:keep_ratio=1/3+halfv") < hiprune


# ----- the processor, streams ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def processor():
    return processing.build_processor("smolvlm", 168, 168)


def test_processor_tiles_and_video_prompt_are_hfs(processor):
    """A wide picture is split into rows × columns of tiles and the global image, each written with its
    row / column token; a video's prompt is what ``SmolVLMProcessor.replace_video_token`` writes."""
    import numpy as np
    from PIL import Image
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string
    from transformers.video_utils import VideoMetadata

    tokenizer = processor.tokenizer
    wide = Image.fromarray(np.random.default_rng(3).integers(0, 256, (84, 250, 3), dtype=np.uint8))
    out = processor(text=[processing.prompt("smolvlm", "what is it?")], images=[[wide]], return_tensors="pt")
    rows, cols = processor.image_processor([[wide]], return_row_col_info=True)["rows"][0][0], 3
    block = get_image_prompt_string(rows, cols, 16, "<fake_token_around_image>", "<image>", "<global-img>")
    assert out["pixel_values"].shape == (1, rows * cols + 1, 3, 168, 168) and rows * cols > 1
    assert out["input_ids"][0].tolist() == tokenizer(processing.prompt("smolvlm", "what is it?").replace("<image>", block))["input_ids"]
    frames = random_frames(4, seed=4, size=168)
    batch = one_shot(processor, frames, "what moved?")
    metadata = VideoMetadata(total_num_frames=4, fps=1.0, duration=3.0, frames_indices=list(range(4)))
    from unittest import mock

    with mock.patch("transformers.models.smolvlm.processing_smolvlm.num2words", number_words):
        expected = processor.replace_video_token({"video_metadata": [metadata]}, 0)
    text = processing.prompt("smolvlm", "what moved?", video=True).replace("<video>", expected)
    assert batch["input_ids"][0].tolist() == tokenizer(text)["input_ids"]
    assert [number_words(n) for n in (4, 30, 64, 99)] == ["four", "thirty", "sixty-four", "ninety-nine"]


@pytest.mark.parametrize("chunks", [(4,), (2, 1, 1)])
def test_stream_equals_the_one_shot_prefill_of_its_frames(model, processor, chunks):
    """The stream writes every frame as the one-shot prompt does (its time, its tokens); it leaves out
    the intro naming the final frame count, so the one-shot prompt here has none either."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_MEDIA_OUTTRO

    from vlmopt.adapters.smolvlm import frame_label, frame_tiles, image_block

    question = "what colour was the first object to appear?"
    frames = random_frames(sum(chunks), seed=len(chunks), size=168)
    text = "".join(frame_label(i) + image_block(processor) for i in range(len(frames))) + DEFAULT_MEDIA_OUTTRO
    prompt = processing.prompt("smolvlm", question, video=True).replace("<video>", text)
    batch = {**processor.tokenizer([prompt], return_tensors="pt"), **frame_tiles(processor, frames)}
    compiled = vlmopt.compile(model)
    expected = compiled.generate(**batch, max_new_tokens=6)[0, batch["input_ids"].shape[1] :].tolist()
    with torch.no_grad():
        assert model.generate(**batch, max_new_tokens=6, do_sample=False)[0, batch["input_ids"].shape[1] :].tolist() == expected
    stream = compiled.stream(processor=processor)
    first = 0
    for count in chunks:
        stream.append(frames[first : first + count])
        first += count
    assert stream.ask(question, max_new_tokens=6).token_ids == expected


def test_hermes_keeps_the_stream_within_its_budget(model, processor):
    compiled = vlmopt.compile(model, passes=["hermes:kv_budget=48,chunk_frames=2"])
    stream = compiled.stream(processor=processor)
    frames = random_frames(8, seed=11, size=168)
    for first in range(0, 8, 2):
        stream.append(frames[first : first + 2])
        assert stream.cache_length <= 48
    assert len(stream.ask("what is there?", max_new_tokens=3).token_ids) >= 1
    assert len(set(stream.kv_bytes_per_chunk[1:])) == 1, "memory stays flat once the budget is reached"


# ----- training, export, command line ------------------------------------------------------------
def test_training_loss_equals_hf(model):
    checks.assert_training_loss_equals_hf(model, images(model, seed=12))


def test_regate_training_loss_equals_hf(model):
    checks.assert_regate_loss_equals_hf(model, images(model, seed=14))


@pytest.mark.slow
def test_export_round_trip_with_hiprune(processor, tmp_path):
    """The export takes one tile per image (its processor does not split) and gives the compiled model's tokens."""
    pytest.importorskip("onnxruntime")
    model = configs.build(configs.CONFIGS["tiny-smolvlm-random"](), seed=62)
    batch = checks.assert_export_round_trip(model, processor, tmp_path, (168, 168))
    assert batch["pixel_values"].shape == (1, 1, 3, 168, 168)


@pytest.mark.slow
def test_apbv_under_two_gloo_ranks_matches_the_simulation(tmp_path):
    """Under ``torchrun`` each rank encodes its own video frames and the ranks give the one-process simulation's answers."""
    from tests.distributed.apbv_worker import SETTINGS, run, tiny_model, video_prompt
    from tests.distributed.test_apbv_group import launch
    from vlmopt.passes import APBV

    model = tiny_model("smolvlm")
    compiled = vlmopt.compile(model, passes=[APBV(hosts=2, **SETTINGS)])
    expected_logits, expected_tokens, _ = run(compiled, video_prompt(model, frames=4))
    results, _ = launch(tmp_path, 2, frames=4, family="smolvlm")
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
        torch.testing.assert_close(result["logits"], expected_logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(result["tokens"], expected_tokens)


def test_command_line_takes_the_random_config(tmp_path):
    name = "tiny-smolvlm-random"
    assert "| hiprune:keep_ratio=1/3 |" in checks.run_cli("bench", "--config", name, "--repeats", "1", "--passes", "hiprune:keep_ratio=1/3")
    assert "| (none) |" in checks.run_cli("eval", "--model", name, "--task", "shapes", "--n", "2", "--passes", "pool_prune:keep_ratio=0.25")
    checks.run_cli("viz", "--model", name, "--passes", "hiprune:keep_ratio=1/3", "--out", str(tmp_path / "kept.png"))
    assert (tmp_path / "kept.png").read_bytes()[:4] == b"\x89PNG"
