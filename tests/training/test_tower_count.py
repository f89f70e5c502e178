"""models/bench/tower_count.py: a tower trained alone learns what one patch shows (colour) within a few
steps; ``--full-attention`` really changes which Qwen blocks see the whole image; bad blocks are refused."""

from __future__ import annotations

import json

import pytest
import torch

from models import train
from models.bench import tower_count
from vlmopt.reference import processing, tasks


def test_colour_probe_learns_on_a_tower_trained_alone(tmp_path):
    tower_count.main(["--model", "tiny-llava", "--steps", "40", "--every", "40", "--json", str(tmp_path / "c.json")])
    curve = json.loads((tmp_path / "c.json").read_text())["curve"]
    assert [p["step"] for p in curve] == [0, 40]
    assert curve[1]["colour"] > curve[0]["colour"] + 0.2
    assert 0.0 < curve[0]["majority_count"] < 1.0


def test_full_attention_blocks_change_the_qwen_tower_output():
    model, processor, _ = train.build_model("tiny-qwen25vl", seed=int(torch.randint(0, 1000, ())))
    task = tasks.TASKS["shapes"](train.TASK_CONFIGS["tiny-llava"]["shapes"])
    inputs = processing.encode(processor, [task.sample("validation", int(torch.randint(0, 100, ())))])
    tap = train.VisionTap(model.model.visual)
    with torch.no_grad():
        windowed = tower_count.tower_tokens(model, tap, True, inputs)
        model.model.visual.fullatt_block_indexes = list(range(model.config.vision_config.depth))
        everywhere = tower_count.tower_tokens(model, tap, True, inputs)
    assert windowed.shape == everywhere.shape and not torch.allclose(windowed, everywhere, atol=1e-4)
    with pytest.raises(ValueError, match="blocks are 0..7"):
        tower_count.count_curve("tiny-qwen25vl", "tiny-llava", [3, 8], steps=1)
    with pytest.raises(ValueError, match="CLIP tower"):
        tower_count.count_curve("tiny-llava", "tiny-llava", [3], steps=1)
