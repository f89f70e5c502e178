"""Processors of the tiled families, built offline: special ids equal the random configs', images expand
as HF's processors expand them, OneVision videos (built by hand: no torchvision) follow the HF video
processor's layout and token count, save / load round trips, and batches of videos HF cannot stack split."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlmopt import configs
from vlmopt.reference import processing
from vlmopt.adapters.llava_onevision import video_inputs, video_tokens


@pytest.fixture(scope="module", params=["tiny-llava-next-random", "tiny-llava-ov-random"])
def named(request):
    named = configs.CONFIGS.named(request.param)
    return named, named.make(), named.processor()


def test_special_ids_and_arch_match_the_random_config(named):
    _, config, processor = named
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id
    assert tokenizer.pad_token_id == config.get_text_config().pad_token_id
    assert tokenizer.eos_token_id == config.get_text_config().eos_token_id
    if config.model_type == "llava_onevision":
        assert tokenizer.convert_tokens_to_ids("<video>") == config.video_token_id
        assert processing.arch_of(processor) == processing.arch_of("llava-hf/llava-onevision-qwen2-7b-ov-hf") == "llava_onevision"
    else:
        assert processing.arch_of(processor) == processing.arch_of("llava-hf/llava-v1.6-vicuna-7b-hf") == "llava_next"
    assert processor.image_processor.image_grid_pinpoints == config.image_grid_pinpoints


def test_images_expand_to_the_model_s_features(named):
    """The processor's ``<image>`` count per image equals the features the adapter plans for it (HF's packing)."""
    from vlmopt.adapters import adapter_for_config

    _, config, processor = named
    rng = np.random.default_rng(1)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((100, 150), (160, 60))]
    text = processing.prompt(processing.arch_of(processor), "what is it?")
    out = processor(text=[text, text], images=pictures, return_tensors="pt", padding=True)
    model = configs.build(config, device="meta")
    plan = adapter_for_config(config)(model).plan_images(dict(out), 2)
    counts = (out["input_ids"] == config.image_token_id).sum(1).tolist()
    assert counts == [image.tokens(config.vision_config.image_size // config.vision_config.patch_size) for image in plan]


def test_onevision_video_inputs_follow_the_hf_processors():
    """Frames at the tower's size come out as the HF image processor normalises a picture of that size;
    the token count is LlavaOnevisionProcessor's (replace_video_token and _get_num_multimodal_tokens)."""
    named = configs.CONFIGS.named("tiny-llava-ov-random")
    processor, side = named.processor(), named.make().vision_config.image_size
    frames = np.random.default_rng(2).integers(0, 256, (3, side, side, 3), dtype=np.uint8)
    videos = video_inputs(frames, processor)["pixel_values_videos"]
    assert videos.shape == (1, 3, 3, side, side)
    base = processor.image_processor(images=[Image.fromarray(frames[1])], return_tensors="pt")["pixel_values"][0, 0]
    torch.testing.assert_close(videos[0, 1], base, rtol=1e-5, atol=1e-5)
    tokens = video_tokens(3, processor)
    assert tokens == len(processor.replace_video_token({"pixel_values_videos": videos}, 0)) // len("<video>")
    assert [tokens] == processor._get_num_multimodal_tokens(video_sizes=[(3, side, side)])["num_video_tokens"]


def test_save_and_load_round_trip(named, tmp_path):
    _, _, processor = named
    processing.save_processor(processor, tmp_path)
    loaded = processing.load_processor(tmp_path)
    assert type(loaded) is type(processor)
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    text = processing.prompt(processing.arch_of(processor), "what is it?")
    ours, theirs = (p(text=[text], images=[picture], return_tensors="pt") for p in (processor, loaded))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_onevision_video_batches_split_where_hf_cannot_stack():
    processor = configs.CONFIGS.named("tiny-llava-ov-random").processor()
    samples = [SimpleNamespace(is_video=True, frames=np.zeros((n, 8, 8, 3), np.uint8)) for n in (4, 4, 6, 4, 4, 4)]
    assert [len(run) for run in processing.batches(processor, samples, 2)] == [2, 1, 2, 1]
    llava = processing.build_processor("llava", 56)
    assert [len(run) for run in processing.batches(llava, samples, 4)] == [4, 2]
