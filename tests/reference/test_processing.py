"""Tokenizers, processors and prompt encoding of the reference models (no trained weights needed)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmopt.reference import processing, tasks


@pytest.fixture(scope="module")
def qwen_processor():
    return processing.build_processor("qwen", 448, 112)


@pytest.fixture(scope="module")
def llava_processor():
    return processing.build_processor("llava", 224)


def _hf_video_patchify():
    """``Qwen2VLVideoProcessor.patchify`` compiled from the installed transformers source (its module
    imports torchvision, so it cannot be imported here; the method itself only uses torch)."""
    import transformers.models.qwen2_vl as pkg

    source = (Path(inspect.getfile(pkg)).parent / "video_processing_qwen2_vl.py").read_text()
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    fn.decorator_list = []
    module = ast.Module(body=[fn], type_ignores=[])
    scope: dict = {"torch": torch}
    exec(compile(ast.fix_missing_locations(module), "patchify", "exec"), scope)  # noqa: S102
    return scope["patchify"]


@pytest.mark.parametrize("frames", [4, 7])
def test_video_layout_matches_hf_video_processor(frames):
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (frames, 112, 112, 3), dtype=np.uint8)
    cfg = processing.video_config(112)
    ours = processing.qwen_video_inputs(clip, cfg)
    x = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(cfg["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["image_std"]).view(1, 3, 1, 1)
    ref, t, h, w = _hf_video_patchify()(None, ((x - mean) / std)[None], 14, 2, 2)
    assert torch.allclose(ours["pixel_values_videos"], ref[0], atol=1e-6)
    assert ours["video_grid_thw"].tolist() == [[t, h, w]] == [[(frames + 1) // 2, 8, 8]]
    assert ours["second_per_grid_ts"].tolist() == [1.0]


def test_static_video_equals_the_image_processor(qwen_processor):
    """A clip of one repeated frame is patchified exactly like that frame as an image."""
    frame = tasks.get("shapes", size=112).sample("test", 0).image
    video = processing.qwen_video_inputs(np.stack([frame, frame]), processing.video_config(112))
    image = qwen_processor.image_processor(images=[frame], return_tensors="pt")
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist()
    assert torch.allclose(video["pixel_values_videos"], image["pixel_values"], atol=1e-5)


def test_qwen_encode_has_token_types_and_expanded_placeholders(qwen_processor):
    image = tasks.get("shapes", size=448).sample("test", 0)
    batch = processing.encode(qwen_processor, [image])
    assert batch["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert int((batch["mm_token_type_ids"] == 1).sum()) == 256
    ids = batch["input_ids"][batch["mm_token_type_ids"] == 1]
    assert (ids == qwen_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).all()

    clip = tasks.get("shapes-video", frames=(32, 34)).sample("test", 0)
    batch = processing.encode(qwen_processor, [clip])
    t = clip.frames.shape[0] // 2
    assert batch["video_grid_thw"].tolist() == [[t, 8, 8]]
    assert int((batch["mm_token_type_ids"] == 2).sum()) == t * 16
    assert batch["pixel_values_videos"].shape == (t * 64, 1176)


def test_llava_encode_expands_256_image_tokens(llava_processor):
    s = tasks.get("shapes").sample("test", 1)
    batch = processing.encode(llava_processor, [s])
    image_id = llava_processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 256
    assert batch["input_ids"][0, 0] == llava_processor.tokenizer.bos_token_id
    assert batch["pixel_values"].shape == (1, 3, 224, 224)


@pytest.mark.parametrize("arch", ["llava", "qwen"])
def test_training_labels_cover_only_the_answer(arch, llava_processor, qwen_processor):
    processor = llava_processor if arch == "llava" else qwen_processor
    samples = [tasks.get("shapes", size=224 if arch == "llava" else 448).sample("test", i) for i in range(3)]
    batch = processing.encode(processor, samples, answers=True)
    tok = processor.tokenizer
    for row, s in zip(batch["labels"], samples):
        kept = row[row != -100].tolist()
        assert tok.convert_ids_to_tokens(kept) == [s.answer, tok.eos_token]
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with its answer


@pytest.mark.parametrize("arch", ["llava", "qwen"])
def test_chat_template_matches_the_prompt(arch, llava_processor, qwen_processor):
    processor = llava_processor if arch == "llava" else qwen_processor
    q = "what colour is the star?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == processing.prompt(arch, q)


def test_prompt_for_gives_processor_arguments(llava_processor):
    s = tasks.get("shapes").sample("test", 2)
    kwargs = processing.prompt_for(llava_processor, s)
    direct = llava_processor(**kwargs, return_tensors="pt")
    assert torch.equal(direct["input_ids"], processing.encode(llava_processor, [s])["input_ids"])
    assert torch.allclose(direct["pixel_values"], processing.encode(llava_processor, [s])["pixel_values"])


def test_models_dir_follows_the_environment(monkeypatch, tmp_path):
    from vlmopt import reference

    monkeypatch.setenv("VLMOPT_MODELS", str(tmp_path))
    assert reference.models_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="known models are tiny-llava, tiny-qwen25vl"):
        reference.path("tiny-llava")
    monkeypatch.delenv("VLMOPT_MODELS")
    assert reference.models_dir().name == "models"
