"""Shared fixtures: tiny HF VLMs built from configs (no downloads), read-only across tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vlmopt import configs
from vlmopt.adapters.llava import llava_config
from vlmopt.adapters.qwen2_5_vl import qwen25vl_config


if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per pytest-xdist worker: the workers share the cores (-n auto: one per core)
    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", help="rewrite golden graph-diff files")


@pytest.fixture
def golden(request):
    """``golden(name, text)``: compare ``text`` with ``golden/<name>.txt`` beside the test."""

    def check(name: str, text: str) -> None:
        path = Path(request.fspath).parent / "golden" / f"{name}.txt"
        if request.config.getoption("--update-goldens"):
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
        assert path.exists(), f"missing golden {path}; run pytest --update-goldens and review the file"
        assert text == path.read_text(), f"graph diff differs from {path} (pytest --update-goldens to accept)"

    return check


@pytest.fixture(scope="session")
def llava_clip():
    return configs.build(llava_config(tower="clip"), seed=1)


@pytest.fixture(scope="session")
def llava_siglip():
    return configs.build(llava_config(tower="siglip"), seed=2)


@pytest.fixture(scope="session")
def qwen():
    return configs.build(qwen25vl_config(), seed=3)


@pytest.fixture(params=["llava_clip", "llava_siglip", "qwen"])
def any_model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["llava_clip", "qwen"])
def family_model(request):
    """One model per family (for pass tests)."""
    return request.getfixturevalue(request.param)


def padded_batch(model, seed: int = 0):
    """Two prompts of different lengths (left padding), one image each."""
    specs = [configs.PromptSpec(text_before=3, text_after=5), configs.PromptSpec(text_before=6, text_after=9)]
    return configs.synthetic_batch(model, specs, seed=seed)


def row(batch: dict, index: int) -> dict:
    """Row ``index`` of a batch made by :func:`configs.synthetic_batch`, unpadded, as its own batch."""
    keep = batch["attention_mask"][index].bool()
    single = {"input_ids": batch["input_ids"][index : index + 1, keep], "attention_mask": batch["attention_mask"][index : index + 1, keep]}
    if "mm_token_type_ids" in batch:
        single["mm_token_type_ids"] = batch["mm_token_type_ids"][index : index + 1, keep]
    if "image_grid_thw" in batch:
        grids = batch["image_grid_thw"]
        sizes = grids.prod(-1).tolist()
        start = sum(sizes[:index])
        single["image_grid_thw"] = grids[index : index + 1]
        single["pixel_values"] = batch["pixel_values"][start : start + sizes[index]]
    elif "pixel_values" in batch:
        single["pixel_values"] = batch["pixel_values"][index : index + 1]
    return single


def assert_batch_equals_rows(compiled, batch: dict, max_new_tokens: int = 6) -> None:
    """Greedy tokens of a batch equal those of each of its rows generated alone."""
    tokens = compiled.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=[])
    seq = batch["input_ids"].shape[1]
    for b in range(batch["input_ids"].shape[0]):
        single = row(batch, b)
        alone = compiled.generate(**single, max_new_tokens=max_new_tokens, eos_token_id=[])
        assert torch.equal(tokens[b, seq:], alone[0, single["input_ids"].shape[1] :]), f"row {b} differs"


def eager_vision_attentions(model, pixel_values):
    """The LLaVA vision tower's attention weights per layer, from HF's eager attention (the model is
    switched back to SDPA afterwards)."""
    model.set_attn_implementation({"vision_config": "eager", "text_config": "sdpa"})
    try:
        with torch.no_grad():
            return model.model.vision_tower(pixel_values, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"vision_config": "sdpa", "text_config": "sdpa"})


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
