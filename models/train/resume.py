"""Resumable training: the state of a run, written every ``TrainConfig.checkpoint_every`` steps to
``<out>/.checkpoint/state.pt`` and read back when the same run starts again in the same directory.

A run resumes by itself: ``python -m models.train --model M [flags]`` finds a checkpoint of the same
configuration (every field but :data:`~models.train.config.NOT_THE_RESULT`) under its output directory
and continues after the last step it holds, with the same weights, optimiser moments, auxiliary heads,
data cursors, validation history and random states, so the run ends where an uninterrupted one would
(to float summation order). A checkpoint of another configuration is refused, never overwritten. The
checkpoint is deleted once the model directory is written.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.train.config import NOT_THE_RESULT, TrainConfig, train_command

CHECKPOINT_DIR = ".checkpoint"
"""Directory of the training state inside a run's output directory (git-ignored)."""
STATE_FILE = "state.pt"
"""The state file in it."""


@dataclass
class Progress:
    """How far a run has got, besides its weights and optimiser."""

    step: int = 0
    """Optimiser steps done."""
    cursors: dict[str, int] = field(default_factory=dict)
    """Task name → next ``train``-split index its batches read."""
    history: list[dict] = field(default_factory=list)
    """Validation points so far (``eval.json``'s ``history``)."""
    seconds: float = 0.0
    """Training seconds so far, over every process the run went through."""
    base_commands: list[str] = field(default_factory=list)
    """Commands that trained the ``init_from`` weights, read when the run first started."""


def state_path(out_dir: Path) -> Path:
    """``<out_dir>/.checkpoint/state.pt``."""
    return Path(out_dir) / CHECKPOINT_DIR / STATE_FILE


def resume_key(cfg: TrainConfig) -> dict:
    """The fields of ``cfg`` that a resumed run must share with the checkpoint (all but speed and saving)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_THE_RESULT}


def save(out_dir: Path, cfg: TrainConfig, model, run, progress: Progress) -> None:
    """Write the run's state atomically: to a temporary file, flushed to disk, then renamed over the
    last checkpoint, so a kill at any moment leaves the previous or the new checkpoint whole."""
    path = state_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "config": resume_key(cfg),
        "progress": dataclasses.asdict(progress),
        "model": model.state_dict(),
        "aux": run.aux.state_dict() if run.aux is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def read(out_dir: Path, cfg: TrainConfig) -> dict | None:
    """The checkpoint under ``out_dir`` (for :func:`restore`), None when there is none. Raises
    ``ValueError`` when it belongs to another configuration."""
    path = state_path(out_dir)
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)  # the run's own file: numpy and Python random states
    theirs, ours = state["config"], resume_key(cfg)
    if theirs != ours:
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        try:
            command = f"`{train_command(TrainConfig(**theirs))} --out {out_dir}`"
        except (TypeError, ValueError):  # a config this code no longer builds
            command = "its own command"
        raise ValueError(
            f"{path} holds a run of another configuration (it differs in {', '.join(differ)}): finish it with "
            f"{command}, or delete {path.parent} to start this run there"
        )
    return state


def restore(state: dict, model, run) -> Progress:
    """Put a checkpoint (:func:`read`) back into ``model`` and ``run`` (weights, aux heads, optimiser,
    random states); returns its progress."""
    model.load_state_dict(state["model"])
    if run.aux is not None:
        run.aux.load_state_dict(state["aux"])
    run.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return Progress(**state["progress"])


def remove(out_dir: Path) -> None:
    """Delete the checkpoint of a finished run (its model directory is written)."""
    path = state_path(out_dir)
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)
    if path.parent.exists() and not any(path.parent.iterdir()):
        path.parent.rmdir()
