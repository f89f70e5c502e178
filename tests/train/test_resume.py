"""CompiledTrainer resumes with the checkpoint's weights for every family, whatever key format the
checkpoint holds (single-file or sharded), reloads the best checkpoint's weights at the end, and refuses a
checkpoint whose weights do not all load (HF's Trainer warns and trains on from the model's own weights)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

import vlmopt
from tests.train import resume_helpers as runs
from vlmopt.errors import CheckpointError
from vlmopt.train.checkpoint import load_weights

pytestmark = pytest.mark.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """``straight(name)``: the uninterrupted run of ``name`` (made once per module) and its folder."""
    made: dict[str, tuple[dict, Path]] = {}

    def run(name: str) -> tuple[dict, Path]:
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            made[name] = (runs.uninterrupted(name, folder), folder)
        return made[name]

    return run


def assert_equal_weights(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys()
    differ = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def assert_resumed_exactly(resumed: dict, straight: dict) -> None:
    checkpoint = straight["at_step"][runs.SAVE_EVERY]
    differ = [key for key in checkpoint if not torch.equal(resumed["before"][key], checkpoint[key])]
    # Norms at their initial ones and zeros, untrained, agree between seeds; every random tensor differs.
    assert len(differ) > len(checkpoint) // 2, "the afresh model must start from other weights than the checkpoint's"
    assert_equal_weights(resumed["at_begin"], checkpoint, "weights after resuming vs the checkpoint's")
    final = straight["at_step"][runs.STEPS]
    for key, value in final.items():
        torch.testing.assert_close(resumed["end"][key], value, rtol=0, atol=1e-6, msg=f"final {key}")
    ours, theirs = resumed["regate"], straight["regate"]
    assert ours["step"] == theirs["step"] == runs.STEPS and ours["ema"].keys() == theirs["ema"].keys()
    for sample, ema in theirs["ema"].items():
        torch.testing.assert_close(ours["ema"][sample], ema, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", runs.tiny_configs())
def test_resume_loads_the_checkpoint_weights_and_continues_as_without_a_stop(name, straight, tmp_path):
    straight_run, folder = straight(name)
    resumed = runs.resumed(name, folder / f"checkpoint-{runs.SAVE_EVERY}", tmp_path)
    assert_resumed_exactly(resumed, straight_run)


CHILD = """
import sys, warnings
warnings.simplefilter("ignore")
import torch
from tests.train import resume_helpers as runs
name, checkpoint, folder, result = sys.argv[1:]
torch.save(runs.resumed(name, checkpoint, folder, seed=5), result)
"""


@pytest.mark.slow
def test_a_run_stopped_and_resumed_in_a_new_process_continues_exactly(straight, tmp_path):
    """The issue's scenario: after a crash, a new process builds the model afresh and resumes (LLaVA,
    whose checkpoints hold the original key format)."""
    name = "tiny-llava-random"
    straight_run, folder = straight(name)
    result = tmp_path / "resumed.pt"
    command = [sys.executable, "-c", CHILD, name, str(folder / f"checkpoint-{runs.SAVE_EVERY}"), str(tmp_path / "run"), str(result)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_resumed_exactly(torch.load(result, weights_only=True), straight_run)


def sharded(source: Path, target: Path) -> Path:
    """A copy of the checkpoint folder ``source`` with its weights split into one shard per tensor (an index beside)."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    (target / "model.safetensors").unlink()
    weight_map = {}
    for number, (key, tensor) in enumerate(sorted(tensors.items()), start=1):
        shard = f"model-{number:05d}-of-{len(tensors):05d}.safetensors"
        save_file({key: tensor.contiguous()}, target / shard, metadata={"format": "pt"})
        weight_map[key] = shard
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


@pytest.mark.parametrize("name", runs.tiny_configs())
def test_checkpoints_load_in_every_key_format_single_file_or_sharded(name, straight, tmp_path):
    straight_run, folder = straight(name)
    checkpoint = folder / f"checkpoint-{runs.SAVE_EVERY}"
    expected = straight_run["at_step"][runs.SAVE_EVERY]
    # The module's own key format, as save_pretrained(save_original_format=False) writes it.
    native = tmp_path / "native"
    native.mkdir()
    save_file({key: value.contiguous() for key, value in expected.items()}, native / "model.safetensors")
    pickled = tmp_path / "pickled"  # the checkpoint's tensors and keys in a pytorch_model.bin
    pickled.mkdir()
    torch.save(load_file(checkpoint / "model.safetensors"), pickled / "pytorch_model.bin")
    for variant in (checkpoint, sharded(checkpoint, tmp_path / "sharded"), native, pickled):
        model = runs.build(name, seed=3)
        load_weights(model, variant)
        assert_equal_weights(runs.weights(model), expected, f"weights loaded from {variant.name}")

    # Resuming from the sharded copy goes through the same loader (no step after it: only the loading is tested).
    resumed = runs.resumed(name, tmp_path / "sharded", tmp_path / "run", steps=runs.SAVE_EVERY)
    assert_equal_weights(resumed["at_begin"], expected, "weights after resuming from the sharded checkpoint")


def tampered(source: Path, target: Path, change) -> Path:
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    change(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def model_keys_of(tensor: torch.Tensor, model_weights: dict) -> list[str]:
    """The model's keys whose weights equal a checkpoint tensor (one, unless it is a norm's ones or a bias's zeros)."""
    return [key for key, value in model_weights.items() if value.shape == tensor.shape and torch.equal(value, tensor)]


@pytest.mark.parametrize("name", runs.tiny_configs())
def test_a_checkpoint_with_a_missing_or_renamed_tensor_is_refused(name, straight, tmp_path):
    straight_run, folder = straight(name)
    checkpoint = folder / f"checkpoint-{runs.SAVE_EVERY}"
    saved = straight_run["at_step"][runs.SAVE_EVERY]
    tensors = load_file(checkpoint / "model.safetensors")
    # tensors that name one model weight (random weights; initial norms and biases repeat)
    model_key = {key: found[0] for key in sorted(tensors) if len(found := model_keys_of(tensors[key], saved)) == 1}
    keys = list(model_key)
    dropped, renamed = keys[-1], keys[0]
    reshaped = next(key for key in keys if tensors[key].dim() >= 2)
    cases = {
        "missing": (lambda tensors: tensors.pop(dropped), [model_key[dropped]]),
        "renamed": (lambda tensors: tensors.update({renamed + "_renamed": tensors.pop(renamed)}),
                    [model_key[renamed], "_renamed"]),
        "reshaped": (lambda tensors: tensors.update({reshaped: tensors[reshaped].flatten()}),
                     [model_key[reshaped], "another shape"]),
    }
    for case, (change, named) in cases.items():
        bad = tampered(checkpoint, tmp_path / case, change)
        model = runs.build(name, seed=4)
        compiled = vlmopt.compile(model, [runs.REGATE], mode="train")
        before = runs.weights(model)
        trainer = runs.trainer(compiled, runs.dataset(model), tmp_path / f"{case}-run", runs.Weights())
        with pytest.raises(CheckpointError) as refused:
            trainer.train(resume_from_checkpoint=str(bad))
        message = str(refused.value)
        assert str(bad) in message and all(text in message for text in named), message
        assert_equal_weights(runs.weights(model), before, f"{case}: the model after a refusal")


class RankEarliestBest(TrainerCallback):
    """Adds the evaluation metric ``earliness`` (minus the step), so that the first checkpoint is the best one
    and reloading it at the end changes the weights (the loss of a few random-model steps ranks no step reliably)."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_earliness"] = -state.global_step


@pytest.mark.parametrize("name", runs.tiny_configs())
def test_the_best_checkpoint_is_reloaded_at_the_end(name, tmp_path):
    model = runs.build(name, seed=1)
    compiled = vlmopt.compile(model, [runs.REGATE], mode="train")
    data = runs.dataset(model)
    recorder = runs.Weights()
    trainer = vlmopt.train.CompiledTrainer(
        compiled, train_dataset=data, eval_dataset=data[:1], data_collator=lambda items: items[0],
        callbacks=[recorder, RankEarliestBest()],
        args=runs.arguments(tmp_path, steps=3, save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                            metric_for_best_model="earliness", greater_is_better=True, prediction_loss_only=True),
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    assert_equal_weights(runs.weights(model), recorder.at_step[1], "weights after reloading checkpoint-1")
    assert compiled.pass_state("regate").step == 1, "the passes' state of checkpoint-1 comes back with its weights"
