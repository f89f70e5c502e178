"""Tokenizers, processors and prompt encoding of the reference models (no trained weights needed)."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmopt.reference import processing, tasks


@pytest.fixture(scope="module")
def qwen_processor():
    return processing.build_processor("qwen2_5_vl", 448, 112)


@pytest.fixture(scope="module")
def llava_processor():
    return processing.build_processor("llava", 224)


@pytest.fixture(scope="module")
def qwen3_processor():
    return processing.build_processor("qwen3_vl", 448, 112)


def _hf_video_patchify(package: str = "qwen2_vl", class_name: str = "Qwen2VLVideoProcessor"):
    """``<class_name>.patchify`` compiled from the installed transformers source (its module
    imports torchvision, so it cannot be imported here; the method itself only uses torch)."""
    import importlib

    pkg = importlib.import_module(f"transformers.models.{package}")
    source = (Path(inspect.getfile(pkg)).parent / f"video_processing_{package}.py").read_text()
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
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


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_training_labels_cover_only_the_answer(arch, llava_processor, qwen_processor, qwen3_processor):
    processor = {"llava": llava_processor, "qwen2_5_vl": qwen_processor, "qwen3_vl": qwen3_processor}[arch]
    samples = [tasks.get("shapes", size=224 if arch == "llava" else 448).sample("test", i) for i in range(3)]
    batch = processing.encode(processor, samples, answers=True)
    tok = processor.tokenizer
    for row, s in zip(batch["labels"], samples):
        kept = row[row != -100].tolist()
        assert tok.convert_ids_to_tokens(kept) == [s.answer, tok.eos_token]
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with its answer


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_chat_template_matches_the_prompt(arch, llava_processor, qwen_processor, qwen3_processor):
    processor = {"llava": llava_processor, "qwen2_5_vl": qwen_processor, "qwen3_vl": qwen3_processor}[arch]
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


def test_arch_of_tells_qwen3_from_qwen25_and_llava(qwen3_processor, qwen_processor, llava_processor):
    assert processing.arch_of(qwen3_processor) == "qwen3_vl"
    assert processing.arch_of(qwen_processor) == "qwen2_5_vl"
    assert processing.arch_of(llava_processor) == "llava"
    for name, arch in (("tiny-qwen3vl", "qwen3_vl"), ("models/tiny-qwen3vl-random", "qwen3_vl"), ("Qwen/Qwen3-VL-8B", "qwen3_vl"),
                       ("tiny-qwen25vl", "qwen2_5_vl"), ("tiny-llava", "llava")):
        assert processing.arch_of(name) == arch
        assert processing.arch_of(Path(name)) == arch


@pytest.mark.parametrize("frames", [4, 9])
def test_qwen3_video_layout_matches_hf_video_processor(frames):
    """Qwen3-VL clips: the HF Qwen3-VL patch layout at the reference model's 14 px patches, its
    normalisation, its clip-wide size bound (112 px frames kept), and no ``second_per_grid_ts``."""
    rng = np.random.default_rng(int(torch.randint(0, 10_000, ())))
    clip = rng.integers(0, 256, (frames, 112, 112, 3), dtype=np.uint8)
    cfg = processing.video_config(112, "qwen3_vl")
    ours = processing.qwen_video_inputs(clip, cfg)
    x = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255
    ref, t, h, w = _hf_video_patchify("qwen3_vl", "Qwen3VLVideoProcessor")(None, ((x - 0.5) / 0.5)[None], 14, 2, 2)
    assert torch.allclose(ours["pixel_values_videos"], ref[0], atol=1e-6)
    assert ours["video_grid_thw"].tolist() == [[t, h, w]] == [[(frames + 1) // 2, 8, 8]]
    assert "second_per_grid_ts" not in ours
    longest = processing.QWEN3_MAX_FRAMES
    assert processing.video_grid(longest, 112, 112, cfg)[1:] == (8, 8, 112, 112)


def test_qwen3_timestamps_and_placeholders_are_hf_qwen3s(qwen3_processor):
    """Each temporal patch's timestamp is ``Qwen3VLProcessor._calculate_timestamps``'s, and a clip's
    prompt text is what ``Qwen3VLProcessor.replace_video_token`` writes for it (fps 2, every frame)."""
    import copy
    import types

    from transformers import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    cfg = processing.video_config(112, "qwen3_vl")
    hf = copy.copy(qwen3_processor)
    hf.video_processor = types.SimpleNamespace(merge_size=2, temporal_patch_size=2)
    for frames in torch.randint(2, 300, (6,)).tolist() + [1, 2, 3]:
        theirs = Qwen3VLProcessor._calculate_timestamps(hf, list(range(frames)), cfg["fps"], 2)
        assert processing.video_timestamps(frames, cfg) == theirs
        grid = torch.tensor([[(frames + 1) // 2, 8, 8]])
        metadata = VideoMetadata(total_num_frames=frames, fps=cfg["fps"], frames_indices=list(range(frames)))
        expected = hf.replace_video_token({"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
        assert processing.qwen3_video_placeholder(frames, grid[0], cfg) == expected


def test_qwen3_tokenizer_knows_every_timestamp_word(qwen3_processor):
    """No timestamp of any clip up to Qwen3's most frames becomes ``<unk>``: the prompts of the two
    video tasks' clips, and every timestamp text a longer clip can hold."""
    tok = qwen3_processor.tokenizer
    cfg = processing.video_config(112, "qwen3_vl")
    longest = processing.video_timestamps(processing.QWEN3_MAX_FRAMES + 1, cfg)
    text = "".join(f"<{t:.1f} seconds>" for t in longest)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids).replace(" ", "") == text.replace(" ", "")
    for task, frames in (("shapes-video", (32, 34)), ("needle", (64, 66))):
        clip = tasks.get(task, frames=frames).sample("test", int(torch.randint(0, 1000, ())))
        batch = processing.encode(qwen3_processor, [clip], answers=True)
        assert tok.unk_token_id not in batch["input_ids"].tolist()[0]
        t = clip.frames.shape[0] // 2
        assert batch["video_grid_thw"].tolist() == [[t, 8, 8]]
        assert int((batch["mm_token_type_ids"] == 2).sum()) == t * 16
        assert (batch["input_ids"][batch["mm_token_type_ids"] == 2] == tok.convert_tokens_to_ids("<|video_pad|>")).all()
        starts = tok.convert_tokens_to_ids("<|vision_start|>")
        assert int((batch["input_ids"] == starts).sum()) == t  # one wrapper per temporal patch
        assert set(batch) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw", "labels"}


def test_qwen3_images_and_static_video_match_the_image_processor(qwen3_processor):
    image = tasks.get("shapes", size=448).sample("test", int(torch.randint(0, 1000, ())))
    batch = processing.encode(qwen3_processor, [image])
    assert batch["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert int((batch["mm_token_type_ids"] == 1).sum()) == 256
    assert batch["pixel_values"].shape == (1024, 3 * 2 * 14 * 14)
    frame = tasks.get("shapes", size=112).sample("test", 3).image
    video = processing.qwen_video_inputs(np.stack([frame, frame]), processing.video_config(112, "qwen3_vl"))
    still = qwen3_processor.image_processor(images=[frame], return_tensors="pt")
    assert video["video_grid_thw"].tolist() == still["image_grid_thw"].tolist()
    assert torch.allclose(video["pixel_values_videos"], still["pixel_values"], atol=1e-5)


def test_qwen3_processor_round_trips_through_its_files(qwen3_processor, tmp_path):
    """Saved and loaded as users load a hub model, the Qwen3-VL processor encodes the same inputs."""
    processing.save_processor(qwen3_processor, tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen3VLProcessor"
    assert json.loads((tmp_path / "video_preprocessor_config.json").read_text())["video_processor_type"] == "Qwen3VLVideoProcessor"
    loaded = processing.load_processor(tmp_path)
    assert type(loaded).__name__ == "Qwen3VLProcessor" and processing.arch_of(loaded) == "qwen3_vl"
    assert loaded.tokenizer.get_vocab() == qwen3_processor.tokenizer.get_vocab()
    i = int(torch.randint(0, 1000, ()))
    for sample in (tasks.get("shapes", size=448).sample("test", i), tasks.get("shapes-video", frames=(32, 34)).sample("test", i)):
        ours, theirs = processing.encode(qwen3_processor, [sample], answers=True), processing.encode(loaded, [sample], answers=True)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_qwen3_checkpoint_loads_like_a_hub_model(tmp_path):
    """``reference.load`` of a Qwen3-VL directory: the HF class, its processor, and the saved model's
    logits on fresh inputs."""
    from models.train import build_model
    from vlmopt import reference

    model, processor, _ = build_model("tiny-qwen3vl", seed=int(torch.randint(0, 1000, ())), lm_layers=4)
    model.eval()
    model.save_pretrained(tmp_path)
    processing.save_processor(processor, tmp_path)
    loaded, loaded_processor = reference.load(tmp_path)
    assert type(loaded).__name__ == "Qwen3VLForConditionalGeneration" and not loaded.training
    assert type(loaded_processor).__name__ == "Qwen3VLProcessor"
    clip = tasks.get("shapes-video", frames=(32, 34)).sample("test", int(torch.randint(0, 1000, ())))
    batch = processing.encode(loaded_processor, [clip])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
