"""models/bench/train_step.py: times each kind of step of a training preset and estimates a full run."""

from __future__ import annotations

import json

import pytest

from models import train as recipe
from models.bench import train_step


def test_times_every_task_of_the_preset_and_estimates_the_run(tmp_path, capsys):
    out = tmp_path / "step.json"
    result = train_step.main(["--model", "tiny-llava", "--steps", "1", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["seconds_per_step"]) == set(recipe.TASK_CONFIGS["tiny-llava"])
    seconds = result["seconds_per_step"]["shapes"]
    assert seconds > 0
    assert result["preset_steps"] == recipe.PRESETS["tiny-llava"].steps
    assert result["estimated_training_minutes"] == pytest.approx(seconds * result["preset_steps"] / 60, abs=0.1)
    assert "s/step" in capsys.readouterr().out


def test_rejects_too_few_steps():
    with pytest.raises(SystemExit):
        train_step.main(["--model", "tiny-llava", "--steps", "0"])
