"""Resumable fine-tuning: :func:`vlmopt.train.finetune.finetune`'s whole state in one file.

Every ``checkpoint_every`` steps the file gets, per run, the weights, the optimiser, the passes' state
(ReGATE's EMAs and step), the teacher (once frozen) and its cached losses, the records so far and the
stopping state; and
the step reached, the settings and torch's random state. It is written to a temporary file, flushed
to disk and renamed over the old one, so a run stopped at any moment leaves the last whole state.
Started again with the same settings, :func:`restore` puts it all back and training goes on at the
next step (the batches are a function of the settings and the step): a stopped run ends as the
unstopped one would. A file written under other settings is refused.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from vlmopt.errors import InputError

FORMAT = "vlmopt-finetune-state/1"
"""Written into every state file; a file without it is refused."""


def _identity(record: dict, learners: list) -> dict[str, Any]:
    """What must match for a state to resume: the settings, the task and the runs."""
    return {
        "config": record["config"], "task": record["task"], "check": record["check"],
        "runs": [[learner.run.label, learner.record["passes"]] for learner in learners],
    }


def save(path: str | Path, step: int, record: dict, learners: list) -> None:
    """Write the state after ``step`` steps to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT, "step": step, "identity": _identity(record, learners), "before": record.get("before"),
        "torch_rng": torch.get_rng_state(),
        "runs": [
            {
                "model": learner.model.state_dict(), "optimizer": learner.optimizer.state_dict(),
                "passes": learner.compiled.pass_states.get_extra_state(),
                "teacher": None if learner.teacher_cache is None else dict(learner.teacher_cache.losses),
                "teacher_model": None if learner.teacher is None else learner.teacher.state_dict(),
                "record": learner.record, "plateau": (learner.plateau.best, learner.plateau.stale),
            }
            for learner in learners
        ],
    }
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def restore(path: str | Path, record: dict, learners: list) -> int | None:
    """Load the state at ``path`` into ``record`` and ``learners``; the steps already taken, or None
    when there is no file (a fresh start)."""
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path} is not a fine-tuning state ({FORMAT}); give another --checkpoint path or delete the file")
    ours, theirs = _identity(record, learners), state["identity"]
    if ours != theirs:
        changed = sorted(k for k in ours if ours[k] != theirs.get(k))
        raise InputError(
            f"{path} holds a fine-tuning run with other settings (they differ in {', '.join(changed)}); run the same "
            "command to resume it, or delete the file (or give another --checkpoint path) to start afresh"
        )
    for learner, saved in zip(learners, state["runs"]):
        learner.model.load_state_dict(saved["model"])
        learner.optimizer.load_state_dict(saved["optimizer"])
        learner.compiled.pass_states.set_extra_state(saved["passes"])
        if learner.teacher_cache is not None:
            learner.teacher_cache.losses = {int(k): v for k, v in saved["teacher"].items()}
        if saved["teacher_model"] is not None:  # frozen at teacher_step: not the model load() gives
            learner.teacher = copy.deepcopy(learner.model).eval()
            learner.teacher.load_state_dict(saved["teacher_model"])
        learner.record.clear()
        learner.record.update(saved["record"])
        learner.plateau.best, learner.plateau.stale = saved["plateau"]
    if state["before"] is not None:
        record["before"] = state["before"]
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
