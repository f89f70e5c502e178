"""The schedule of a run: learning rate, which task each step trains on, the curriculum, each step's samples."""

from __future__ import annotations

import dataclasses
import math

from models.train.config import TrainConfig
from vlmopt.reference import tasks


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_plan(cfg: TrainConfig) -> list[str]:
    """Which task each step trains on."""
    video_tasks = ["shapes-video", "needle"]
    plan, k = [], 0
    for step in range(cfg.steps):
        if cfg.video_every and step >= cfg.video_from and (step - cfg.video_from) % cfg.video_every == cfg.video_every - 1:
            plan.append(video_tasks[k % 2])
            k += 1
        else:
            plan.append("shapes")
    return plan


def phase_task(task: tasks.Task, step: int, cfg: TrainConfig) -> tasks.Task:
    """``task`` with the object count of the curriculum phase ``step`` is in."""
    lo, hi = next(phase[1:] for phase in reversed(cfg.curriculum) if step >= phase[0])
    config = dataclasses.replace(task.config, objects=(lo, hi))
    return task if config == task.config else type(task)(config)


def training_batch(task, cfg: TrainConfig, start: int) -> list:
    """The ``train``-split samples ``start, start + 1, ...`` of one step on ``task``: ``cfg.batch_size``
    of them, ``cfg.video_batch_size`` for a video task."""
    size = cfg.video_batch_size if task.video else cfg.batch_size
    return [task.sample("train", start + i) for i in range(size)]
