"""The training recipe on Qwen3-VL (``tiny-qwen3vl``): its architecture, and every piece of the recipe
that reads the model (LM attention rows with Q/K norms, the tower's received attention without
windows, M-RoPE positions, the losses on pictures and videos) checked against HF's own computation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers.models.qwen3_vl import modeling_qwen3_vl

from models import arch as archs
from models import train
from models.train import tower_guide
from vlmopt.reference import processing, tasks


def _seed() -> int:
    return int(torch.randint(0, 10_000, ()))


@pytest.fixture(scope="module")
def small():
    """A fresh tiny-qwen3vl with a 4-layer LM (the preset's widths; fast) and its processor."""
    model, processor, _ = train.build_model("tiny-qwen3vl", seed=_seed(), lm_layers=4)
    return model, processor


def _random_norms(model) -> None:
    """Make every Q/K norm weight of the LM differ from one, so that a recomputation skipping them fails."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.mul_(torch.empty_like(norm.weight).uniform_(0.5, 1.5))


def test_the_architecture_is_qwen3_vl_with_twelve_lm_layers_and_deepstack():
    arch = archs.Qwen3Arch()
    processor = processing.build_processor("qwen3_vl", arch.image_size, arch.video_size)
    config = archs.qwen3_config(arch, processor.tokenizer)
    vision, text = config.vision_config, config.text_config
    assert config.model_type == "qwen3_vl" and text.num_hidden_layers == 12
    assert vision.deepstack_visual_indexes == [2, 4, 6] and max(vision.deepstack_visual_indexes) < vision.depth - 1
    assert vision.num_position_embeddings == (448 // 14) ** 2 and vision.patch_size == 14
    assert text.head_dim == 32 and text.rope_parameters["mrope_section"] == [6, 5, 5]
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert archs.qwen3_mrope_section(128) == [24, 20, 20]  # Qwen3-VL-8B's, which the tiny one scales
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with pytest.raises(ValueError, match="num_position_embeddings=256 must be 1024"):
        archs.Qwen3Arch(num_position_embeddings=256)
    with pytest.raises(ValueError, match="below the last"):
        archs.Qwen3Arch(deepstack_visual_indexes=(3, 7))
    with pytest.raises(ValueError, match="mrope_interleaved"):
        train.TrainConfig(model="tiny-qwen3vl", steps=1, batch_size=1, mrope_interleaved=True)
    assert train.PRESETS["tiny-qwen3vl"].lm_layers == 12


def test_recomputed_lm_attention_rows_equal_eager_weights_with_qk_norms(small):
    """The guide's rows, recomputed under SDPA from each layer's Q/K projections, Q/K norms and
    interleaved M-RoPE, are HF's eager weights: left-padded images, and a video with its timestamps."""
    model, processor = small
    _random_norms(model)
    cfg = dataclasses.replace(train.PRESETS["tiny-qwen3vl"], tower_guide_weight=0.0)
    taps = train.Taps.attach(model, cfg, qwen=True)
    start = _seed()
    images = [tasks.TASKS["shapes"](train.TASK_CONFIGS["tiny-qwen3vl"]["shapes"]).sample("train", start + i) for i in range(3)]
    clip = tasks.get("needle", frames=(64, 66)).sample("train", start)
    language = model.model.language_model
    try:
        for samples in (images, [clip]):
            turns, _ = train.training_turns(samples, 2, cell=28)
            batch = processing.encode(processor, samples, answers=True, turns=turns)
            language.config._attn_implementation = "eager"
            with torch.no_grad():
                out = model(**batch, output_attentions=True)
            language.config._attn_implementation = "sdpa"
            with torch.no_grad():
                model(**batch)  # the taps keep the SDPA run's inputs
            L = batch["input_ids"].shape[1]
            last = len(samples) - 1
            rows, positions = torch.tensor([0, last, last, 0]), torch.tensor([L - 1, L - 5, L - 3, L // 2])
            for layer, weights in enumerate(out.attentions):
                with torch.no_grad():
                    mine = train.lm_attention_rows(taps.lm, layer, batch["attention_mask"], rows, positions)
                torch.testing.assert_close(mine, weights[rows, :, positions], atol=1e-6, rtol=1e-5)
    finally:
        language.config._attn_implementation = "sdpa"
        taps.remove()


def test_tower_received_attention_is_each_images_dense_attention_in_raster_order(small, monkeypatch):
    """Qwen3-VL's tower attends over each whole image (no windows): the guide's received attention
    per merged token equals the column means of the block's eager attention weights, pooled over each
    2×2 merge group, in the merged tokens' raster order."""
    model, processor = small
    visual = model.model.visual
    block = int(torch.randint(0, visual.config.depth, ()))
    recorded = []
    eager = modeling_qwen3_vl.eager_attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
        if module is visual.blocks[block].attn:
            recorded.append(weights.detach())
        return out, weights

    monkeypatch.setattr(modeling_qwen3_vl, "eager_attention_forward", recording)
    monkeypatch.setattr(visual.config, "_attn_implementation", "eager")
    tap = train.AttentionTap([visual.blocks[block].attn])
    task = tasks.TASKS["shapes"](train.TASK_CONFIGS["tiny-qwen3vl"]["shapes"])
    batch = processing.encode(processor, [task.sample("train", _seed() + i) for i in range(2)])
    with torch.no_grad():
        visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        window = train.qwen_windows(model, batch["image_grid_thw"])
        hidden, rotary = tap.inputs[0]
        mine = tower_guide._qwen_received(tap.modules[0], hidden, rotary, batch["image_grid_thw"], window["window_index"], window["merge_unit"])
    tap.remove()
    assert torch.equal(window["window_index"], torch.arange(2 * 256))
    assert len(recorded) == len(mine) == 2  # one attention call per image: no windows, no image sees another
    for image, weights in enumerate(recorded):  # [1, heads, 1024, 1024]
        assert weights.shape == (1, visual.config.num_heads, 1024, 1024)
        theirs = weights[0].mean(dim=(0, 1)).reshape(-1, 4).mean(-1)
        torch.testing.assert_close(mine[image], theirs, atol=1e-7, rtol=1e-5)


def test_every_loss_of_the_recipe_trains_qwen3_on_pictures_and_videos(small):
    """One training step on pictures and one on a needle video: every loss is finite, and the answer
    loss reaches the tower's absolute positions and the DeepStack mergers."""
    model, processor = small
    cfg = dataclasses.replace(train.PRESETS["tiny-qwen3vl"], lm_layers=4, tower_guide_weight=0.0)
    taps = train.Taps.attach(model, cfg, qwen=True)
    aux = train.AuxHeads.for_model(model, cfg, qwen=True)
    start = _seed()
    pictures = [tasks.TASKS["shapes"](train.TASK_CONFIGS["tiny-qwen3vl"]["shapes"]).sample("train", start + i) for i in range(2)]
    video = [tasks.TASKS["needle"](train.TASK_CONFIGS["tiny-qwen3vl"]["needle"]).sample("train", start)]
    try:
        for samples, terms in ((pictures, {"colour", "shape", "centre", "coords", "counts", "relation"}), (video, {"colour", "shape", "centre", "coords", "counts"})):
            model.zero_grad()
            total, answer, aux_loss, guide, tower, parts = train.forward_loss(model, processor, samples, aux, taps, cfg, qwen=True)
            assert all(torch.isfinite(x) for x in (total, answer, aux_loss, guide)) and float(guide) > 0
            assert terms <= set(parts)
            total.backward()
            visual = model.model.visual
            assert visual.pos_embed.weight.grad.abs().sum() > 0
            assert all(m.linear_fc2.weight.grad.abs().sum() > 0 for m in visual.deepstack_merger_list)
    finally:
        taps.remove()


def test_video_evidence_is_the_video_tokens_between_the_timestamps(small):
    """The guide and the probes index a Qwen3-VL clip's visual tokens only: the k-th ``<|video_pad|>``
    of the prompt is the k-th merged token of the tower (temporal patch, then raster), whatever
    timestamp text lies between the frames."""
    model, processor = small
    clip = tasks.TASKS["shapes-video"](train.TASK_CONFIGS["tiny-qwen3vl"]["shapes-video"]).sample("train", _seed())
    turns, evidence = train.training_turns([clip], 3, cell=28)
    batch = processing.encode(processor, [clip], answers=True, turns=turns)
    video_id = model.config.video_token_id
    visual_pos = np.flatnonzero(batch["input_ids"][0].numpy() == video_id)
    patches = clip.frames.shape[0] // 2
    assert len(visual_pos) == patches * 16 == len(train.aux_targets([clip], 28))
    ids = batch["input_ids"][0].tolist()
    stamps = processing.video_timestamps(clip.frames.shape[0], processing.video_config(112, "qwen3_vl"))
    for patch in range(1, patches):  # between two temporal patches: their wrappers and the later one's timestamp
        between = processor.tokenizer.convert_ids_to_tokens(ids[visual_pos[16 * patch - 1] + 1 : visual_pos[16 * patch]])
        assert between[0] == "<|vision_end|>" and between[-1] == "<|vision_start|>"
        assert "".join(between[1:-1]) == f"<{stamps[patch]:.1f}seconds>"
    for _, groups in evidence[0]:
        for tokens in groups:
            assert len(tokens) == 0 or tokens.max() < len(visual_pos)


def test_mrope_positions_are_qwen3s_own(small):
    """The positions the recipe passes once background tokens are masked are Qwen3-VL's ``get_rope_index``
    on the full mask, and the training forward without them equals HF's own."""
    model, processor = small
    task = tasks.TASKS["shapes"](train.TASK_CONFIGS["tiny-qwen3vl"]["shapes"])
    samples = [task.sample("train", _seed() + i) for i in range(3)]
    turns, _ = train.training_turns(samples, 2, 28)
    batch = processing.encode(processor, samples, answers=True, turns=turns)
    positions = train.qwen_image_positions(model, batch)
    theirs, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"]
    )
    assert torch.equal(positions, theirs)
    image_rows = positions[1:, 0][:, batch["input_ids"][0] == model.config.image_token_id]
    assert image_rows[0].unique().numel() == 16 and image_rows[1].unique().numel() == 16  # a 16×16 merged grid
