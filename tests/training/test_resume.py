"""Resumable training (models/train/resume.py): a run stopped and started again ends where an
uninterrupted one ends."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from models import train
from models.train import resume
from models.train.step import Run


def _tiny(**overrides) -> train.TrainConfig:
    """A few-step tiny-llava run with every loss the preset trains with, saving every other step."""
    settings = dict(
        steps=6, batch_size=2, extra_turns=1, eval_every=3, eval_n=2, test_n=2, warmup=2, checkpoint_every=2, threads=1,
        seed=int(torch.randint(0, 1000, ())),
    )
    return dataclasses.replace(train.PRESETS["tiny-llava"], **{**settings, **overrides})


class Stop(Exception):
    """Stands for the process being killed."""


def _stop_after(monkeypatch, steps: int) -> None:
    """Make the run stop (an exception out of :meth:`Run.step`) when it starts step ``steps``."""
    real = Run.step

    def step(self, model, processor, batch_samples, index):
        if index == steps:
            raise Stop(f"stopped before step {index}")
        return real(self, model, processor, batch_samples, index)

    monkeypatch.setattr(Run, "step", step)


def test_a_stopped_run_resumes_where_it_stopped_and_ends_like_an_unstopped_one(tmp_path, monkeypatch):
    cfg = _tiny()
    whole = train.train(cfg, tmp_path / "whole", log=lambda *a: None)
    assert not (tmp_path / "whole" / resume.CHECKPOINT_DIR).exists()  # removed once the model is written

    with monkeypatch.context() as patch:
        _stop_after(patch, 5)
        with pytest.raises(Stop):
            train.train(cfg, tmp_path / "stopped", log=lambda *a: None)
    state = torch.load(resume.state_path(tmp_path / "stopped"), weights_only=False)
    assert state["progress"]["step"] == 4  # the last multiple of checkpoint_every before the stop
    assert [p["step"] for p in state["progress"]["history"]] == [3]
    assert not list((tmp_path / "stopped" / resume.CHECKPOINT_DIR).glob("*.tmp"))

    lines = []
    again = train.train(cfg, tmp_path / "stopped", log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any(line.startswith("resuming from step 4") for line in lines)
    ours, theirs = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "stopped" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=1e-6)
    assert [{k: v for k, v in p.items() if k != "minutes"} for p in again["history"]] == [
        {k: v for k, v in p.items() if k != "minutes"} for p in whole["history"]
    ]
    assert again["train_command"] == whole["train_command"]
    assert again["test"]["shapes"]["fixed"]["predictions"] == whole["test"]["shapes"]["fixed"]["predictions"]
    assert not (tmp_path / "stopped" / resume.CHECKPOINT_DIR).exists()


def test_a_stop_after_the_last_step_only_evaluates_again(tmp_path, monkeypatch):
    """Killed during the final evaluation, the run starts again at its evaluation, with its weights."""
    cfg = _tiny(steps=2, eval_every=2)
    with monkeypatch.context() as patch:
        patch.setattr(train.loop, "finish", lambda *a, **k: (_ for _ in ()).throw(Stop("killed while evaluating")))
        with pytest.raises(Stop):
            train.train(cfg, tmp_path / "m", log=lambda *a: None)
    saved = torch.load(resume.state_path(tmp_path / "m"), weights_only=False)
    assert saved["progress"]["step"] == 2
    _stop_after(monkeypatch, 0)  # no training step may run again
    results = train.train(cfg, tmp_path / "m", log=lambda *a: None)
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in saved["model"].items() if k in weights)
    assert results["history"] == saved["progress"]["history"]


def test_a_checkpoint_of_another_run_is_refused_not_overwritten(tmp_path, monkeypatch):
    cfg = _tiny(steps=4)
    with monkeypatch.context() as patch:
        _stop_after(patch, 3)
        with pytest.raises(Stop):
            train.train(cfg, tmp_path / "m", log=lambda *a: None)
    before = resume.state_path(tmp_path / "m").read_bytes()
    with pytest.raises(ValueError, match=r"differs in lr\): finish it with .*--out") as error:
        train.train(dataclasses.replace(cfg, lr=2 * cfg.lr), tmp_path / "m", log=lambda *a: None)
    assert f"`{train.train_command(cfg)} --out {tmp_path / 'm'}`" in str(error.value)
    assert resume.state_path(tmp_path / "m").read_bytes() == before
    # speed and saving settings are not the run's: they may change between the two halves
    assert resume.resume_key(dataclasses.replace(cfg, threads=2, checkpoint_every=7)) == resume.resume_key(cfg)


def test_checkpoint_settings_are_not_in_the_recorded_command():
    cfg = dataclasses.replace(train.PRESETS["tiny-qwen25vl"], checkpoint_every=5, threads=1)
    assert train.train_command(cfg) == "python -m models.train --model tiny-qwen25vl"
    parsed, _ = train.parse_args(["--model", "tiny-qwen25vl", "--checkpoint-every", "5"])
    assert parsed.checkpoint_every == 5
    with pytest.raises(ValueError, match="checkpoint_every=0 must be at least 1"):
        dataclasses.replace(cfg, checkpoint_every=0)
    for name, preset in train.PRESETS.items():
        assert train.train_command(preset) == f"python -m models.train --model {name}"
        assert json.loads(json.dumps(resume.resume_key(preset))).keys() == resume.resume_key(preset).keys()
