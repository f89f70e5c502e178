"""Shared exports for the lowering tests: each (model, passes) is exported once per session.

Exports take ~20 s each on 2 CPU cores, so the models here are the tiny configs cut to two vision
and two text layers (three for HalfV), and the exports below are shared by every test in this folder:

* ``llava``, ``llava+random_prune``, ``qwen`` — random-weight configs, Python API, no processor;
* ``qwen_proc+pool_prune`` — a processor-backed Qwen2.5-VL (tokenizer + image processor), Python API;
* ``llava_proc+hiprune`` — a processor-backed LLaVA, exported through ``vlmopt export``;
* ``llava3+halfv``, ``qwen3+halfv`` — random-weight configs with three text layers, cut inside the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vlmopt import configs
from vlmopt.adapters.llava import llava_config
from vlmopt.adapters.qwen2_5_vl import qwen25vl_config

QWEN_IMAGE = 112
"""Qwen exports are fixed to 112×112 px images (8×8 patches, 16 merged tokens)."""

EXPORTS = {
    "llava": ("small_llava", []),
    "llava+random_prune": ("small_llava", ["random_prune:keep_ratio=0.5"]),
    "qwen": ("small_qwen", []),
    "qwen_proc+pool_prune": ("qwen_with_processor", ["pool_prune:keep_ratio=0.25"]),
    "llava3+halfv": ("llava_three_layers", ["halfv"]),
    "qwen3+halfv": ("qwen_three_layers", ["halfv"]),
}


@dataclass
class Export:
    """One shared export."""

    out: Path
    """The export directory."""
    model: Any
    processor: Any
    passes: list[str]
    checkpoint: Path | None = None
    """The model's checkpoint directory (processor-backed models only)."""


@pytest.fixture(scope="session")
def small_llava():
    return configs.build(llava_config(vision_layers=2, text_layers=2), seed=11)


@pytest.fixture(scope="session")
def small_qwen():
    return configs.build(qwen25vl_config(vision_depth=2, full_attention_blocks=(1,), text_layers=2), seed=12)


@pytest.fixture(scope="session")
def llava_three_layers():
    """HalfV needs three text layers (a probe, a cut, a later stage)."""
    return configs.build(llava_config(vision_layers=2, text_layers=3), seed=15)


@pytest.fixture(scope="session")
def qwen_three_layers():
    return configs.build(qwen25vl_config(vision_depth=2, full_attention_blocks=(1,), text_layers=3), seed=16)


def _save(model, processor, directory: Path) -> Path:
    from vlmopt.reference import processing

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processing.save_processor(processor, directory)
    return directory


@pytest.fixture(scope="session")
def llava_with_processor(tmp_path_factory) -> Path:
    """A checkpoint directory: tiny LLaVA (56 px images, 16 tokens) with the reference processor."""
    from models import arch
    from vlmopt.reference import processing

    processor = processing.build_processor("llava", image_size=56)
    shape = arch.LlavaArch(
        image_size=56, vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64,
        text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=96,
    )
    model = configs.build(arch.llava_config(shape, processor.tokenizer), seed=13)
    return _save(model, processor, tmp_path_factory.mktemp("llava_ckpt"))


@pytest.fixture(scope="session")
def qwen_with_processor(tmp_path_factory) -> Path:
    """A checkpoint directory: tiny Qwen2.5-VL (≤ 112 px images) with the reference processor."""
    from models import arch
    from vlmopt.reference import processing

    processor = processing.build_processor("qwen2_5_vl", image_size=QWEN_IMAGE)
    shape = arch.QwenArch(
        image_size=QWEN_IMAGE, vision_hidden=32, vision_depth=2, vision_heads=2, vision_intermediate=64,
        fullatt_block_indexes=(1,), window_size=56, text_hidden=64, text_layers=2, text_heads=4,
        text_kv_heads=2, text_intermediate=96,
    )
    model = configs.build(arch.qwen_config(shape, processor.tokenizer), seed=14)
    return _save(model, processor, tmp_path_factory.mktemp("qwen_ckpt"))


def load(source):
    """(model, processor) of a fixture value: a model, or a checkpoint directory."""
    if isinstance(source, Path):
        from vlmopt import reference

        return reference.load(source)
    return source, None


@pytest.fixture(scope="session")
def exported(request, tmp_path_factory):
    """``exported(name)`` → :class:`Export`, exporting on first use (see :data:`EXPORTS`)."""
    pytest.importorskip("onnxruntime", reason="the lowering tests need onnxruntime (pip install 'vlmopt[onnx]')")
    pytest.importorskip("onnxscript", reason="the lowering tests need onnxscript (pip install 'vlmopt[onnx]')")
    from vlmopt.export import ExportConfig, export_onnx

    cache: dict[str, Export] = {}

    def get(name: str) -> Export:
        if name not in cache:
            if name == "llava_proc+hiprune":
                cache[name] = _cli_export(request, tmp_path_factory)
            else:
                fixture, passes = EXPORTS[name]
                source = request.getfixturevalue(fixture)
                model, processor = load(source)
                out = tmp_path_factory.mktemp(name.replace("+", "_"))
                size = QWEN_IMAGE if model.config.model_type == "qwen2_5_vl" else None
                export_onnx(model, out, passes=passes, config=ExportConfig(image_size=size, seed=3), processor=processor)
                cache[name] = Export(out, model, processor, passes, source if isinstance(source, Path) else None)
        return cache[name]

    return get


def _cli_export(request, tmp_path_factory) -> Export:
    from vlmopt.cli import main

    checkpoint = request.getfixturevalue("llava_with_processor")
    out = tmp_path_factory.mktemp("llava_proc_hiprune")
    passes = ["hiprune:keep_ratio=0.33"]
    code = main(["export", "--model", str(checkpoint), "--passes", passes[0], "--format", "onnx", "--out", str(out)])
    assert code == 0
    model, processor = load(checkpoint)
    return Export(out, model, processor, passes, checkpoint)


@pytest.fixture(scope="session")
def picture(tmp_path_factory) -> Path:
    """A random-noise-plus-shapes PNG (never a blank image)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8))
    ImageDraw.Draw(image).ellipse((20, 10, 60, 50), fill=(230, 40, 40))
    path = tmp_path_factory.mktemp("images") / "shapes.png"
    image.save(path)
    return path


def _fresh_batch(export: Export, seed: int) -> dict:
    """A left-padded two-prompt batch (one image each) of fresh random pixels and tokens, as torch tensors."""
    import torch
    from PIL import Image

    from vlmopt.export.graphs import one_image_batch
    from vlmopt.export.inputs import prompt_text
    from vlmopt.export.manifest import read_manifest

    size = read_manifest(export.out)["layout"]["image_size"][0]
    if export.processor is None:
        specs = [configs.PromptSpec(text_before=2, text_after=6), configs.PromptSpec(text_before=7, text_after=3)]
        return one_image_batch(export.model, size, specs, seed)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(2)]
    family = export.model.config.model_type
    texts = [prompt_text(export.processor, family, q) for q in ("what colour is the circle?", "how many squares are there in the picture?")]
    out = export.processor(text=texts, images=images, return_tensors="np", padding=True)
    keep = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    return {k: torch.from_numpy(np.asarray(out[k])) for k in keep if k in out}


@pytest.fixture(scope="session")
def fresh_batch():
    """``fresh_batch(export, seed)`` → processor-like torch inputs never seen by the export."""
    return _fresh_batch


def _unsupported_model(opset: int = 18):
    """A small graph with one node per rejection rule, each with a recognisable name."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [None])
    big = helper.make_tensor("big", TensorProto.INT64, [1], [5000])
    inner = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["u"], name="unique_inside_if")], "then", [], [helper.make_tensor_value_info("u", TensorProto.FLOAT, [None])]
    )
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    nodes = [
        helper.make_node("NonZero", ["x"], ["nz"], name="find_kept"),
        helper.make_node("Compress", ["x", "cond"], ["c"], name="compress_tokens"),
        helper.make_node("TopK", ["x", "k"], ["v", "i"], name="dynamic_topk", sorted=0),
        helper.make_node("TopK", ["x", "big"], ["v2", "y"], name="huge_topk"),
        helper.make_node("ReduceSum", ["x", "k"], ["s"], name="runtime_axes"),
        helper.make_node("If", ["cond"], ["branch"], name="branchy", then_branch=inner, else_branch=inner),
        helper.make_node("MyPruner", ["x"], ["p"], name="custom_pruner", domain="acme"),
    ]
    graph = helper.make_graph(nodes, "bad", [x, k, cond], [y], initializer=[big])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("acme", 1)])


@pytest.fixture(scope="session")
def unsupported_model():
    """``unsupported_model()`` → an ``onnx.ModelProto`` with one node per TensorRT rejection rule."""
    pytest.importorskip("onnx", reason="needs onnx (pip install 'vlmopt[onnx]')")
    return _unsupported_model
