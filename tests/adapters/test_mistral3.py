"""Mistral 3 end to end: bit-exact with HF for images of different native sizes in one padded batch
(2-D RoPE and block-diagonal attention in the Pixtral tower, ``[IMG_BREAK]`` / ``[IMG_END]`` as text,
the 2×2 patch merger), every pass, HiPrune's score over the merged patches of each image, the
processor's prompt against HF's source, the training graph, export and the command line."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import vlmopt
from tests.adapters import family_checks as checks
from vlmopt import configs
from vlmopt.adapters.mistral3 import IMG_BREAK, IMG_END, mistral3_config
from vlmopt.errors import IncompatiblePassError
from vlmopt.graph.probe import run_with_probes
from vlmopt.reference import processing


@pytest.fixture(scope="module")
def model():
    return configs.build(mistral3_config(text_layers=4), seed=71)


def images(model, seed=1):
    """Two left-padded rows: a 8×8-patch image and a 4×6 one, and a 6×8 one after longer text (all
    padded to the tower's largest 112 px image, as the processor pads a batch)."""
    specs = [configs.PromptSpec(images=2, text_before=3, text_after=5), configs.PromptSpec(images=1, text_before=9, text_after=7)]
    return configs.synthetic_batch(model, specs, image_grids=[(8, 8), (4, 6), (6, 8)], seed=seed)


# ----- bit-exact without a lossy pass -------------------------------------------------------------
def test_logits_and_greedy_tokens_equal_hf(model):
    batch = images(model)
    assert (batch["attention_mask"] == 0).any() and len(set(map(tuple, batch["image_sizes"].tolist()))) == 3
    checks.assert_bit_exact(model, batch)
    single = configs.synthetic_batch(model, [configs.PromptSpec(images=1, text_before=4)], image_grids=[(2, 4)], seed=3)
    checks.assert_bit_exact(model, single)


def test_structural_text_stays_and_the_grid_skips_it(model):
    """The visual slots are the ``[IMG]`` tokens only; HiPrune keeps a third of them and every
    ``[IMG_BREAK]`` / ``[IMG_END]`` stays in the sequence."""
    batch = images(model, seed=2)
    compiled = vlmopt.compile(model, passes=["hiprune:keep_ratio=1/3"])
    prompt = compiled.plan(batch)
    ids = batch["input_ids"].reshape(-1)
    assert (ids[prompt.inputs["visual_positions"]] == model.config.image_token_id).all()
    assert prompt.layout.grids == ((1, 4, 4), (1, 2, 3), (1, 3, 4))
    _, values = run_with_probes(compiled.stages["prefill"], dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=0),
                                lambda n: n.name == "sequence_index")
    index = values["sequence_index"]
    kept = torch.stack([batch["input_ids"][b, index[b].clamp(min=0)] for b in range(2)]).masked_fill(index < 0, -1)
    for token in (IMG_BREAK, IMG_END):
        assert ((kept == token).sum(1) == (batch["input_ids"] == token).sum(1)).all()
    assert (kept == model.config.image_token_id).sum() == compiled.visual_tokens_kept(prompt) < prompt.layout.total


def test_lossless_settings_are_exact(model):
    checks.assert_lossless_settings_are_exact(model, images(model, seed=4))


# ----- every pass ------------------------------------------------------------------------------
def test_every_pass_runs(model):
    checks.run_every_pass(model, images(model, seed=6))
    with pytest.raises(IncompatiblePassError, match="there is no video to stream"):
        vlmopt.compile(model, passes=["hermes:kv_budget=40"])


@pytest.mark.parametrize("spec", ["hiprune:keep_ratio=1/3", "halfv"])
def test_golden_graph_diff(model, golden, spec):
    base = vlmopt.compile(model)
    golden(f"mistral3_{spec.split(':')[0]}", vlmopt.graph.diff(base.graph, vlmopt.compile(model, passes=[spec]).graph))


def test_hiprune_scores_are_each_images_attention_over_merged_patches(model):
    """Per image (block-diagonal attention, 2-D RoPE applied), the attention each 2×2 block of patches
    receives, averaged; HF's tower runs each image alone here so its eager weights are one image's."""
    batch = images(model, seed=7)
    compiled = vlmopt.compile(model, passes=["hiprune:keep_ratio=1/3,object_layer=1,deep_layer=3"])
    prompt = compiled.plan(batch)
    _, values = run_with_probes(compiled.stages["prefill"], dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=0),
                                lambda n: n.name in ("vision_1_received", "vision_3_received"))
    model.set_attn_implementation({"vision_config": "eager", "text_config": "sdpa"})
    expected = {1: [], 3: []}
    try:
        with torch.no_grad():
            for pixels, size, (_, h, w) in zip(batch["pixel_values"], batch["image_sizes"], prompt.layout.grids):
                attentions = model.model.vision_tower(pixels[None], image_sizes=size[None], output_attentions=True).attentions
                for block in expected:
                    expected[block].append(checks.merged_scores(attentions[block], 0, (h, w), 2))
    finally:
        model.set_attn_implementation({"vision_config": "sdpa", "text_config": "sdpa"})
    for block, parts in expected.items():
        torch.testing.assert_close(values[f"vision_{block}_received"], torch.cat(parts), rtol=1e-5, atol=1e-7)


def test_pruning_lowers_the_llm_flops(model):
    batch = configs.synthetic_batch(model, [configs.PromptSpec(images=1, text_before=4, text_after=8)], image_grids=[(8, 8)], seed=9)
    hiprune = checks.llm_flops_ratio(model, batch, "hiprune:keep_ratio=1/3")
    assert hiprune < 0.8 and checks.llm_flops_ratio(model, batch, "hiprune:keep_ratio=1/3+halfv") < hiprune


# ----- the processor -------------------------------------------------------------------------------
def hf_replace_image_token():
    """``PixtralProcessor.replace_image_token`` compiled from the installed source (its module imports
    torchvision, so it cannot be imported here; the method itself is plain Python)."""
    import transformers.models.pixtral as package

    source = (Path(inspect.getfile(package)).parent / "processing_pixtral.py").read_text()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "PixtralProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "replace_image_token")
    scope: dict = {}
    exec(compile(ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[])), "replace_image_token", "exec"), scope)  # noqa: S102
    return scope["replace_image_token"]


def test_processor_prompt_is_pixtrals():
    import numpy as np
    from PIL import Image

    processor = processing.build_processor("mistral3", 112, 112)
    pictures = [Image.fromarray(np.random.default_rng(s).integers(0, 256, shape, dtype=np.uint8)) for s, shape in
                ((1, (60, 110, 3)), (2, (112, 112, 3)))]
    prompt = processing.prompt("mistral3", "what is it?")
    out = processor(text=[prompt] * 2, images=[[p] for p in pictures], return_tensors="pt")
    pixels = processor.image_processor(pictures, patch_size={"height": 28, "width": 28}, return_tensors="pt")
    assert torch.equal(out["pixel_values"], pixels["pixel_values"]) and out["image_sizes"].tolist() == [[84, 112], [112, 112]]
    hf = hf_replace_image_token()
    for row, size in enumerate(out["image_sizes"].tolist()):
        expected = prompt.replace("[IMG]", hf(processor, {"image_sizes": [size]}, 0))
        ids = out["input_ids"][row][out["attention_mask"][row].bool()].tolist()
        assert ids == processor.tokenizer(expected)["input_ids"]


# ----- training, export, command line ------------------------------------------------------------
def test_training_loss_equals_hf(model):
    checks.assert_training_loss_equals_hf(model, images(model, seed=12))


def test_regate_training_loss_equals_hf(model):
    checks.assert_regate_loss_equals_hf(model, images(model, seed=14))


@pytest.mark.slow
def test_export_round_trip_with_hiprune(tmp_path):
    pytest.importorskip("onnxruntime")
    model = configs.build(configs.CONFIGS["tiny-mistral3-random"](), seed=72)
    checks.assert_export_round_trip(model, processing.build_processor("mistral3", 112, 112), tmp_path, (80, 112),
                                    export_size=(112, 112))


@pytest.mark.slow
def test_apbv_under_two_gloo_ranks_matches_the_simulation(tmp_path):
    """Under ``torchrun`` each rank encodes its own images and the ranks give the one-process simulation's answers."""
    from tests.distributed.apbv_worker import SETTINGS, run, tiny_model, video_prompt
    from tests.distributed.test_apbv_group import launch
    from vlmopt.passes import APBV

    model = tiny_model("mistral3")
    compiled = vlmopt.compile(model, passes=[APBV(hosts=2, **SETTINGS)])
    expected_logits, expected_tokens, _ = run(compiled, video_prompt(model, frames=4))
    results, _ = launch(tmp_path, 2, frames=4, family="mistral3")
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
        torch.testing.assert_close(result["logits"], expected_logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(result["tokens"], expected_tokens)


def test_command_line_takes_the_random_config(tmp_path):
    name = "tiny-mistral3-random"
    assert "| hiprune:keep_ratio=1/3 |" in checks.run_cli("bench", "--config", name, "--repeats", "1", "--passes", "hiprune:keep_ratio=1/3")
    assert "| (none) |" in checks.run_cli("eval", "--model", name, "--task", "shapes", "--n", "2", "--passes", "hiprune:keep_ratio=1/3")
    checks.run_cli("viz", "--model", name, "--passes", "hiprune:keep_ratio=1/3", "--out", str(tmp_path / "kept.png"))
    assert (tmp_path / "kept.png").read_bytes()[:4] == b"\x89PNG"
