"""The shipped reference models load offline (processor included) and answer at their recorded accuracy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from models import card
from vlmopt import reference
from vlmopt.reference import evaluate

TOLERANCE = 2
"""Answers (out of the fixed set) that may flip between machines (float summation order)."""

BELOW_TARGET = {
    "tiny-qwen25vl": "78.4% on images (videos 85.3% meet their target); relative position is at chance and counting lags ",
    "tiny-qwen3vl": "88.6% on images, counting at 50% (videos 89.2% and the other families meet their targets) after "
                    "the preset run and a fine-tune aimed at counting (models/tiny-qwen3vl/TRAINING.md)",
}
"""Reference models shipped below the project's targets, and why (see their model cards)."""


def _shipped(name: str) -> bool:
    return (reference.models_dir() / name / "model.safetensors").exists()


@pytest.fixture(scope="module", params=[n for n in reference.MODEL_NAMES])
def shipped(request):
    name = request.param
    if not _shipped(name):
        pytest.skip(f"{name} weights are not in {reference.models_dir()} (train it: python -m models.train --model {name})")
    model, processor = reference.load(name)
    record = json.loads((reference.path(name) / "eval.json").read_text())
    return name, model, processor, record


def test_path_finds_names_and_local_dirs(tmp_path):
    assert reference.path(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="tiny-llava.*tiny-qwen25vl.*local"):
        reference.path("no-such-model")


def test_import_is_lazy():
    code = (
        "import sys, vlmopt\n"
        "assert 'vlmopt.reference' not in sys.modules, 'import vlmopt imported vlmopt.reference'\n"
        "import vlmopt.reference\n"
        "heavy = [m for m in ('vlmopt.reference.tasks', 'PIL', 'triton', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_loads_offline_like_a_hub_model(shipped):
    name, model, processor, record = shipped
    from transformers import AutoTokenizer

    assert not model.training
    assert type(model).__name__ == {
        "tiny-llava": "LlavaForConditionalGeneration", "tiny-qwen25vl": "Qwen2_5_VLForConditionalGeneration",
        "tiny-qwen3vl": "Qwen3VLForConditionalGeneration",
    }[name]
    assert type(processor).__name__ == {"tiny-llava": "LlavaProcessor", "tiny-qwen25vl": "Qwen2_5_VLProcessor", "tiny-qwen3vl": "Qwen3VLProcessor"}[name]
    tok = AutoTokenizer.from_pretrained(reference.path(name), local_files_only=True)
    assert tok.eos_token == processor.tokenizer.eos_token
    assert model.generation_config.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("task_name", reference.TASK_NAMES)
def test_fixed_set_accuracy_matches_the_record(shipped, task_name):
    name, model, processor, record = shipped
    if task_name not in record["test"]:
        pytest.skip(f"{name} is not trained on {task_name}")
    fixed = record["test"][task_name]["fixed"]
    task = reference.task_for(name, task_name)
    torch.manual_seed(0)
    result = evaluate.evaluate(model, processor, task, "test", n=fixed["n"], batch_size=fixed["n"])
    agree = sum(a == b for a, b in zip(result.correct, fixed["correct"]))
    assert agree >= fixed["n"] - TOLERANCE, (result.predictions, fixed["predictions"])
    assert abs(result.accuracy - fixed["accuracy"]) <= TOLERANCE / fixed["n"]
    samples = task.samples("test", n=fixed["n"])
    for family, by_answer in result.per_answer.items():
        counts = {a: sum((s.family, s.answer) == (family, a) for s in samples) for a in by_answer}
        assert set(by_answer) <= set(task.families[family]) and all(counts.values())
        weighted = sum(by_answer[a] * counts[a] for a in by_answer) / sum(counts.values())
        assert weighted == pytest.approx(result.per_family[family])


def test_recorded_targets(shipped, request):
    """The model card's numbers (n = 500 test samples) meet the project's targets.

    A model shipped below target is a known shortfall (its card says so): the test is then a strict
    xfail, so it starts failing, and must be updated, as soon as a retrained model meets them.
    """
    name, _, _, record = shipped
    checks = card.targets(record)
    missed = [f"{what}: {100 * value:.1f}% (goal {goal})" for what, value, goal, met in checks if not met]
    if name in BELOW_TARGET:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=f"{name} is below target ({BELOW_TARGET[name]})"))
    assert not missed, missed


def test_text_only_control_is_near_the_majority_rate(shipped):
    name, model, processor, _ = shipped
    task = reference.task_for(name, "shapes")
    n = 40
    result = evaluate.evaluate(model, processor, task, "test", n=n, batch_size=n, start=1000, text_only=True)
    looking = evaluate.evaluate(model, processor, task, "test", n=n, batch_size=n, start=1000)
    assert result.accuracy <= result.majority["overall"] + 0.2
    assert looking.accuracy >= result.accuracy + 0.4
