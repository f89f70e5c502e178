"""Fine-tune a reference VLM on a task with the compiled training graph, several pass lists in lockstep.

>>> runs = [Run("standard", []), Run("regate", [vlmopt.passes.ReGATE(keep=0.25)])]
>>> result = finetune(lambda: reference.load("tiny-llava"), task, runs, FinetuneConfig(steps=400))
>>> result["runs"][1]["loss_tokens"], result["runs"][1]["test"]["accuracy"]

Every run starts from its own fresh copy of the model (``load()`` is called once per run) and sees
the same batches in the same order: step ``s`` of every run trains on the same samples, with the
same extra turns, and the runs take turns step by step, so that a change in the machine's load hits
them alike and their times per step compare. A training batch is ``batch_size`` samples of the
task's training split, each encoded with its answer and ``turns`` more (question, answer) turns
about the same picture (:meth:`vlmopt.reference.tasks.Sample.more_questions`), every answer token (the
word and the end token) labelled: the format the reference models were trained in. The training set
is the first ``train_n`` samples, reshuffled every epoch with ``seed``.

A run with a ReGATE pass gets ``sample_ids`` (the sample index) and ``teacher_losses`` from the
default teacher: a frozen copy of its model as it is before the first step, text only
(:func:`vlmopt.train.teacher_losses`), computed the first time a sample is seen and cached.

Along the way each run is evaluated on ``eval_n`` validation samples (greedy answers, the reference
models' evaluation: :func:`vlmopt.reference.evaluate.evaluate`) at step 0, every ``eval_every`` steps
and at the end; the final model on ``test_n`` test samples. A run records the tokens in the loss
(the answer tokens that carried it, ``out.active_tokens``) cumulatively, and the seconds of each
step (forward, backward, optimiser step; not the batch encoding nor the teacher).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from vlmopt.errors import InputError

#: Steps left out of the median time per step (the first steps allocate and warm caches).
TIMING_WARMUP = 3


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune (shared by every run of one :func:`finetune` call)."""

    steps: int
    """Optimiser steps per run, ≥ 1."""
    batch_size: int = 8
    """Samples per step, ≥ 1."""
    lr: float = 3e-4
    """AdamW learning rate after a linear warm-up, > 0 (constant after it)."""
    lr_warmup: int = 10
    """Steps of the learning rate's linear warm-up, ≥ 0."""
    weight_decay: float = 0.0
    """AdamW weight decay, ≥ 0."""
    seed: int = 0
    """Seeds the data order, the extra turns and torch."""
    turns: int = 8
    """Extra (question, answer) turns per picture, ≥ 0."""
    train_n: int | None = None
    """Training samples (indices 0..train_n-1 of the train split); None: ``steps × batch_size`` (one pass)."""
    eval_every: int = 50
    """Validation accuracy every this many steps (and at step 0 and the end), ≥ 1."""
    eval_n: int = 100
    """Validation samples per evaluation along the way, ≥ 1."""
    test_n: int = 500
    """Test samples the final model is scored on (0: none)."""
    eval_batch_size: int = 32
    """Samples per generate() batch in evaluations, ≥ 1."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global norm), > 0."""

    def __post_init__(self) -> None:
        counts = {"steps": 1, "batch_size": 1, "eval_every": 1, "eval_n": 1, "eval_batch_size": 1, "turns": 0,
                  "lr_warmup": 0, "test_n": 0}
        for name, low in counts.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"FinetuneConfig.{name} must be a whole number ≥ {low}, got {value!r}")
        if self.train_n is not None and (not isinstance(self.train_n, int) or self.train_n < self.batch_size):
            raise InputError(
                f"FinetuneConfig.train_n must be at least the batch size ({self.batch_size}), got {self.train_n!r}"
            )
        for name in ("lr", "max_grad_norm"):
            if not float(getattr(self, name)) > 0:
                raise InputError(f"FinetuneConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not float(self.weight_decay) >= 0:
            raise InputError(f"FinetuneConfig.weight_decay must be ≥ 0, got {self.weight_decay!r}")

    @property
    def training_samples(self) -> int:
        return self.train_n if self.train_n is not None else self.steps * self.batch_size


@dataclass
class Run:
    """One fine-tuning run: a label and its pass list (empty: standard fine-tuning)."""

    label: str
    passes: list = field(default_factory=list)


def batch_order(config: FinetuneConfig) -> list[list[int]]:
    """Training sample indices of every step: the first ``train_n`` samples, reshuffled each epoch."""
    rng = np.random.default_rng([config.seed, 7])
    order: list[int] = []
    while len(order) < config.steps * config.batch_size:
        order += rng.permutation(config.training_samples).tolist()
    size = config.batch_size
    return [order[s * size : (s + 1) * size] for s in range(config.steps)]


class _Learner:
    """One run's model, compiled training graph, optimiser, teacher and records."""

    def __init__(self, run: Run, model, config: FinetuneConfig) -> None:
        import vlmopt
        from vlmopt.passes import ReGATE

        self.run, self.model, self.config = run, model, config
        self.compiled = vlmopt.compile(model, run.passes, mode="train")
        self.teacher = copy.deepcopy(model).eval() if any(isinstance(p, ReGATE) for p in self.compiled.passes) else None
        self.teacher_cache = None
        if self.teacher is not None:
            from vlmopt.train import TeacherCache

            self.teacher_cache = TeacherCache(meta={"teacher": "the model before fine-tuning, text only"})
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.record: dict[str, Any] = {
            "label": run.label, "passes": [str(p) for p in run.passes], "curve": [], "losses": [], "step_seconds": [],
            "loss_tokens": 0, "answer_tokens": 0,
        }

    def step(self, step: int, batch: dict, ids: list[int]) -> float:
        extras: dict[str, Any] = {}
        if self.teacher is not None:
            missing = [row for row, i in enumerate(ids) if i not in self.teacher_cache]
            if missing:
                from vlmopt.train import teacher_losses

                self.teacher_cache.add(ids, batch["labels"], teacher_losses(self.teacher, batch))
            extras = {"sample_ids": ids, "teacher_losses": self.teacher_cache.for_batch(ids, batch["labels"])}
        warm = self.config.lr_warmup
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * min(1.0, (step + 1) / warm) if warm else self.config.lr
        self.model.train()
        began = time.perf_counter()
        out = self.compiled(**batch, **extras)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - began
        record = self.record
        record["step_seconds"].append(seconds)
        record["losses"].append(float(out.loss.detach()))
        record["loss_tokens"] += int(out.active_tokens.sum())
        record["answer_tokens"] += int((batch["labels"] != -100).sum())
        return float(out.loss.detach())

    def evaluate(self, step: int, processor, task) -> float:
        from vlmopt.reference.evaluate import evaluate

        result = evaluate(self.model, processor, task, "validation", n=self.config.eval_n, batch_size=self.config.eval_batch_size)
        self.record["curve"].append({
            "step": step, "loss_tokens": self.record["loss_tokens"], "answer_tokens": self.record["answer_tokens"],
            "accuracy": result.accuracy, "per_family": result.per_family,
        })
        return result.accuracy

    def finish(self, processor, task) -> dict:
        record = self.record
        timed = record["step_seconds"][TIMING_WARMUP:] or record["step_seconds"]
        record["median_step_s"] = statistics.median(timed)
        record["loss_token_fraction"] = record["loss_tokens"] / max(1, record["answer_tokens"])
        if self.config.test_n:
            record["test"] = score_on_test(self.model, processor, task, self.config)
        if self.teacher is not None:
            record["regate_steps"] = self.compiled.pass_state("regate").step
        return record


def score_on_test(model, processor, task, config: FinetuneConfig) -> dict:
    """``{n, accuracy, per_family}`` of ``model`` on the first ``config.test_n`` test samples."""
    from vlmopt.reference.evaluate import evaluate

    result = evaluate(model, processor, task, "test", n=config.test_n, batch_size=config.eval_batch_size)
    return {"n": result.n, "accuracy": result.accuracy, "per_family": result.per_family}


def _progress(total: int, enabled: bool):
    """A tqdm bar if tqdm is installed, else a plain line every tenth of the run (both on stderr)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="fine-tuning", unit="step", file=sys.stderr)
    except ImportError:
        return None


def finetune(
    load: Callable[[], tuple[Any, Any]], task, runs: list[Run], config: FinetuneConfig, progress: bool = True,
    before_test: bool = True,
) -> dict:
    """Fine-tune one fresh model per run in lockstep (see the module docstring); returns the record:
    ``config``, ``task``, ``before`` (the untouched model's test accuracy, when ``before_test`` and
    ``test_n``) and ``runs`` (per run: ``curve`` [{step, loss_tokens, accuracy, ...}], ``losses``,
    ``step_seconds``, ``median_step_s``, ``loss_tokens``, ``answer_tokens``, ``test``); and, not for
    JSON, ``models`` and ``compiled``: each run's fine-tuned model and its compiled training graph."""
    from vlmopt.reference import processing

    if not runs:
        raise InputError("finetune needs at least one run")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise InputError(f"run labels must differ, got {labels}")
    torch.manual_seed(config.seed)
    learners, processor = [], None
    for run in runs:
        model, processor = load()
        learners.append(_Learner(run, model, config))
    record: dict[str, Any] = {"task": task.name, "config": asdict(config), "runs": []}
    if before_test and config.test_n:
        record["before"] = score_on_test(learners[0].model, processor, task, config)
    for learner in learners:
        learner.evaluate(0, processor, task)
    bar = _progress(config.steps, progress)
    for step, ids in enumerate(batch_order(config)):
        samples = [task.sample("train", i) for i in ids]
        turns = [s.more_questions(config.turns, seed=config.seed) for s in samples] if config.turns else None
        batch = processing.encode(processor, samples, answers=True, turns=turns)
        losses = [learner.step(step, batch, ids) for learner in learners]
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            accuracies = [learner.evaluate(done, processor, task) for learner in learners]
            if bar is not None:
                bar.set_postfix_str(" ".join(f"{r.label[:12]}={a:.2f}" for r, a in zip(runs, accuracies)))
        if bar is not None:
            bar.update(1)
        elif progress and (done % max(1, config.steps // 10) == 0 or done == config.steps):
            print(f"step {done}/{config.steps} " + " ".join(f"{r.label}: loss {v:.3f}" for r, v in zip(runs, losses)),
                  file=sys.stderr)
    if bar is not None:
        bar.close()
    record["runs"] = [learner.finish(processor, task) for learner in learners]
    record["models"] = [learner.model for learner in learners]
    record["compiled"] = [learner.compiled for learner in learners]
    return record


def plot(record: dict, path: str, title: str | None = None) -> None:
    """Held-out accuracy against the tokens in the loss, one line per run (a PNG; needs matplotlib)."""
    from vlmopt.plots import pyplot

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=90)
    for run in record["runs"]:
        xs = [point["loss_tokens"] for point in run["curve"]]
        ys = [100 * point["accuracy"] for point in run["curve"]]
        axis.plot(xs, ys, marker="o", markersize=3, label=f"{run['label']} ({run['median_step_s']:.2f} s/step)")
    axis.set_xlabel("tokens in the loss (cumulative)")
    axis.set_ylabel(f"validation accuracy % (n={record['config']['eval_n']})")
    axis.set_title(title or f"fine-tuning on {record['task']}", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
