"""Fine-tune a reference VLM on a task with the compiled training graph, several pass lists in lockstep.

>>> runs = [Run("standard", []), Run("regate", [vlmopt.passes.ReGATE(keep=0.25)])]
>>> result = finetune(lambda: reference.load("tiny-llava"), task, runs, FinetuneConfig(steps=400, patience=4))
>>> summarize(result)["runs"][1]["to_reference_peak"]       # vlmopt.train.finetune_report

Every run starts from its own fresh copy of the model (``load()`` is called once per run) and sees
the same batches in the same order: step ``s`` of every run trains on the same samples, with the
same extra turns, and the runs take turns step by step, so that a change in the machine's load hits
them alike and their times per step compare. A training batch is ``batch_size`` samples of the
task's training split, each encoded with its answer and ``turns`` more (question, answer) turns
about the same picture (:meth:`vlmopt.reference.tasks.Sample.more_questions`), every answer token (the
answer's words and the end token) labelled: the format the reference models were trained in. The
training set is the first ``train_n`` samples, reshuffled every epoch with ``seed``.

A run with a ReGATE pass gets ``sample_ids`` (the sample index) and ``teacher_losses`` from its
pass's ``teacher`` (:data:`vlmopt.passes.regate.TEACHERS`): a frozen copy of its model as it is
before step ``teacher_step`` (0: before the first), computed the first time a sample is seen after
that and cached.

Along the way each run is evaluated on ``eval_n`` validation samples (greedy answers, scored by the
task: accuracy, or a caption's fact F1) at step 0 and every ``eval_every`` steps, and on ``check_n``
validation samples of a ``check`` task (the one-word families the model was trained on: are they
forgotten?). With ``patience``, a run stops once its validation score has not beaten its best by more
than ``min_delta`` for ``patience`` evaluations in a row (it has plateaued); when the reference run
(the first without passes) plateaus, the others stop there too (``follow_reference``). A run
records the tokens in the loss (the answer tokens that carried it, ``out.active_tokens``), the
seconds of each training step (forward, backward, optimiser step; not the batch encoding) and of its
teacher, all cumulative at each evaluation. With ``checkpoint``, the whole state is written there
every ``checkpoint_every`` steps and the same call resumes from it (:mod:`vlmopt.train.finetune_state`).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
    """Optimiser steps per run at most (a run that plateaus stops before), ≥ 1."""
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
    """Validation score every this many steps (and at step 0 and the last step), ≥ 1."""
    eval_n: int = 100
    """Validation samples per evaluation along the way, ≥ 1."""
    test_n: int = 500
    """Test samples the final model is scored on (0: none)."""
    eval_batch_size: int = 32
    """Samples per generate() batch in evaluations, ≥ 1."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global norm), > 0."""
    patience: int | None = None
    """Stop a run after this many evaluations in a row without beating its best score by more than
    ``min_delta`` (a window of ``patience × eval_every`` steps); None: every run takes ``steps`` steps."""
    min_delta: float = 0.0
    """The least rise of the validation score that counts as an improvement, ≥ 0."""
    check_n: int = 0
    """Validation samples of the ``check`` task (one-word families) per evaluation, ≥ 0 (0: none)."""
    follow_reference: bool = True
    """Runs with passes ignore their own plateau and stop when the reference run (the first without
    passes) plateaus (the experiment is "until the standard run plateaus"); False: each run stops at
    its own plateau."""

    def __post_init__(self) -> None:
        counts = {"steps": 1, "batch_size": 1, "eval_every": 1, "eval_n": 1, "eval_batch_size": 1, "turns": 0,
                  "lr_warmup": 0, "test_n": 0, "check_n": 0}
        if self.patience is not None:
            counts["patience"] = 1
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
        for name in ("weight_decay", "min_delta"):
            if not float(getattr(self, name)) >= 0:
                raise InputError(f"FinetuneConfig.{name} must be ≥ 0, got {getattr(self, name)!r}")

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


@dataclass
class Plateau:
    """Has a score stopped improving? After ``patience`` updates in a row that did not beat the best
    score so far by more than ``min_delta``, yes (``patience=None``: never)."""

    patience: int | None
    """Updates without an improvement that make a plateau (None: no plateau ever)."""
    min_delta: float = 0.0
    """The least rise over the best that counts as an improvement."""
    best: float = float("-inf")
    """The best score that counted as an improvement."""
    stale: int = 0
    """Updates since that improvement."""

    def update(self, score: float) -> bool:
        """Take the next score; whether the scores have plateaued."""
        if score > self.best + self.min_delta:
            self.best, self.stale = score, 0
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience


class _Learner:
    """One run's model, compiled training graph, optimiser, teacher, records and stopping state."""

    def __init__(self, run: Run, model, config: FinetuneConfig) -> None:
        import vlmopt
        from vlmopt.passes import ReGATE

        self.run, self.model, self.config = run, model, config
        self.compiled = vlmopt.compile(model, run.passes, mode="train")
        self.gate = next((p for p in self.compiled.passes if isinstance(p, ReGATE)), None)
        self.teacher_kind = self.gate.teacher if self.gate is not None else None
        self.teacher = None
        """The frozen teacher, once the run reaches the gate's ``teacher_step``."""
        self.teacher_cache = None
        if self.gate is not None:
            from vlmopt.train import TeacherCache

            self.teacher_cache = TeacherCache(meta={"teacher": f"{self.gate.teacher}: the model after {self.gate.teacher_step} steps"})
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.record: dict[str, Any] = {
            "label": run.label, "passes": [str(p) for p in run.passes], "teacher": self.teacher_kind, "curve": [],
            "losses": [], "step_seconds": [], "step_dense": [], "loss_tokens": 0, "answer_tokens": 0,
            "teacher_seconds": 0.0, "stopped": None,
        }
        self.plateau = Plateau(config.patience, config.min_delta)
        self.own_plateau = True
        """Does its own plateau stop it? (With ``follow_reference`` and a reference run, only the reference's.)"""

    @property
    def active(self) -> bool:
        return self.record["stopped"] is None

    def gate_inputs(self, batch: dict, ids: list[int], blank_batch: Callable[[], dict]) -> dict[str, Any]:
        """ReGATE's batch inputs (``sample_ids``, ``teacher_losses``); the teacher is frozen at its step
        and run on samples it has not seen (on the blank picture's batch for ``teacher=blank``)."""
        from vlmopt.passes.regate import TEACHERS
        from vlmopt.train import teacher_losses

        state = self.compiled.pass_state("regate")
        self.record["step_dense"].append(state.is_dense())
        if self.teacher is None and state.step >= self.gate.teacher_step:
            self.teacher = copy.deepcopy(self.model).eval()
        if self.teacher is None:  # every step before teacher_step (<= warmup_steps) is dense: the losses are not read
            return {"sample_ids": ids, "teacher_losses": torch.zeros(batch["labels"].shape)}
        if any(i not in self.teacher_cache for i in ids):
            began = time.perf_counter()
            seen = blank_batch() if self.teacher_kind == "blank" else batch
            self.teacher_cache.add(ids, batch["labels"], teacher_losses(self.teacher, seen, visual=TEACHERS[self.teacher_kind]))
            self.record["teacher_seconds"] += time.perf_counter() - began
        return {"sample_ids": ids, "teacher_losses": self.teacher_cache.for_batch(ids, batch["labels"])}

    def step(self, step: int, batch: dict, ids: list[int], blank_batch: Callable[[], dict]) -> float:
        extras = self.gate_inputs(batch, ids, blank_batch) if self.gate is not None else {}
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

    def evaluate(self, step: int, processor, task, check=None) -> float:
        from vlmopt.reference.evaluate import evaluate

        config, record = self.config, self.record
        result = evaluate(self.model, processor, task, "validation", n=config.eval_n, batch_size=config.eval_batch_size)
        point = {
            "step": step, "loss_tokens": record["loss_tokens"], "answer_tokens": record["answer_tokens"],
            "seconds": sum(record["step_seconds"]), "teacher_seconds": record["teacher_seconds"],
            "accuracy": result.accuracy, "per_family": result.per_family,
        }
        if check is not None and config.check_n:
            point["check"] = evaluate(self.model, processor, check, "validation", n=config.check_n,
                                      batch_size=config.eval_batch_size).accuracy
        record["curve"].append(point)
        if self.plateau.update(result.accuracy) and self.own_plateau:
            record["stopped"] = {"step": step, "reason": "plateau"}
        return result.accuracy

    def finish(self, processor, task) -> dict:
        record = self.record
        if record["stopped"] is None:
            record["stopped"] = {"step": len(record["step_seconds"]), "reason": "steps"}
        timed = record["step_seconds"][TIMING_WARMUP:] or record["step_seconds"]
        record["median_step_s"] = statistics.median(timed)
        sparse = [s for s, dense in zip(record["step_seconds"], record["step_dense"]) if not dense][TIMING_WARMUP:]
        record["median_sparse_step_s"] = statistics.median(sparse) if sparse else None
        record["loss_token_fraction"] = record["loss_tokens"] / max(1, record["answer_tokens"])
        if self.config.test_n:
            record["test"] = score_on_test(self.model, processor, task, self.config)
        if self.gate is not None:
            record["regate_steps"] = self.compiled.pass_state("regate").step
        return record


def score_on_test(model, processor, task, config: FinetuneConfig) -> dict:
    """``{n, accuracy, per_family}`` of ``model`` on the first ``config.test_n`` test samples."""
    from vlmopt.reference.evaluate import evaluate

    result = evaluate(model, processor, task, "test", n=config.test_n, batch_size=config.eval_batch_size)
    return {"n": result.n, "accuracy": result.accuracy, "per_family": result.per_family}


def _last_point(learner: _Learner) -> str:
    """``label score (check c) [plateau]`` of a run's latest evaluation."""
    point = learner.record["curve"][-1]
    check = f" (check {point['check']:.3f})" if "check" in point else ""
    return f"{learner.run.label} {point['accuracy']:.4f}{check}" + ("" if learner.active else " [plateau]")


def _follow_reference(learners: list[_Learner], step: int, config: FinetuneConfig) -> None:
    """Stop every run still going once the reference run (the first without passes) has plateaued."""
    reference = next((lr for lr in learners if not lr.run.passes), None)
    if not config.follow_reference or reference is None or reference.active:
        return
    for learner in learners:
        if learner.active:
            learner.record["stopped"] = {"step": step, "reason": "reference plateau"}


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


def finetune(
    load: Callable[[], tuple[Any, Any]], task, runs: list[Run], config: FinetuneConfig, progress: bool = True,
    before_test: bool = True, check=None, checkpoint: str | Path | None = None, checkpoint_every: int = 25,
) -> dict:
    """Fine-tune one fresh model per run in lockstep (see the module docstring); returns the record:
    ``config``, ``task``, ``check`` (the check task's name), ``before`` (the untouched model's test
    accuracy, when ``before_test`` and ``test_n``) and ``runs`` (per run: ``curve`` [{step,
    loss_tokens, seconds, teacher_seconds, accuracy, check, ...}], ``losses``, ``step_seconds``,
    ``step_dense``, ``median_step_s``, ``median_sparse_step_s``, ``loss_tokens``, ``answer_tokens``,
    ``stopped``, ``test``); and, not for JSON, ``models`` and ``compiled``: each run's fine-tuned
    model and its compiled training graph. ``check``: a task whose ``check_n`` validation samples are
    scored at every evaluation too. ``checkpoint``: a file the state is written to every
    ``checkpoint_every`` steps and resumed from (the caller deletes it once the results are safe)."""
    from vlmopt.reference import processing
    from vlmopt.train import finetune_state

    if not runs:
        raise InputError("finetune needs at least one run")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise InputError(f"run labels must differ, got {labels}")
    if config.check_n and check is None:
        raise InputError(f"FinetuneConfig.check_n is {config.check_n} but no check task was given; pass check=<a task> or check_n=0")
    torch.manual_seed(config.seed)
    learners, processor = [], None
    for run in runs:
        model, processor = load()
        learners.append(_Learner(run, model, config))
    if config.follow_reference and any(not r.passes for r in runs):
        for learner in learners:
            learner.own_plateau = not learner.run.passes
    record: dict[str, Any] = {"task": task.name, "config": asdict(config), "check": getattr(check, "name", None), "runs": []}
    start = finetune_state.restore(checkpoint, record, learners) if checkpoint else None
    if start is None:
        start = 0
        if before_test and config.test_n:
            record["before"] = score_on_test(learners[0].model, processor, task, config)
        for learner in learners:
            learner.evaluate(0, processor, task, check)
    else:
        _say(progress, f"resumed from {checkpoint} after step {start}")
    order = batch_order(config)
    for step in range(start, config.steps):
        active = [learner for learner in learners if learner.active]
        if not active:
            break
        ids = order[step]
        samples = [task.sample("train", i) for i in ids]
        turns = [s.more_questions(config.turns, seed=config.seed) for s in samples] if config.turns else None
        batch = processing.encode(processor, samples, answers=True, turns=turns)
        blank: dict = {}

        def blank_batch() -> dict:  # the same samples on a blank picture, encoded once per step
            if not blank:
                blank.update(processing.encode(processor, [s.text_only() for s in samples], answers=True, turns=turns))
            return blank

        losses = {learner.run.label: learner.step(step, batch, ids, blank_batch) for learner in active}
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            for learner in active:
                learner.evaluate(done, processor, task, check)
            _follow_reference(learners, done, config)
            _say(progress, f"step {done}: validation " + ", ".join(_last_point(learner) for learner in active))
        elif done % 5 == 0:
            _say(progress, f"step {done}: loss " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items())
                 + " | s/step " + ", ".join(f"{lr.record['step_seconds'][-1]:.2f}" for lr in active))
        if checkpoint and (done % checkpoint_every == 0 or not any(lr.active for lr in learners)):
            finetune_state.save(checkpoint, done, record, learners)
    record["runs"] = [learner.finish(processor, task) for learner in learners]
    record["models"] = [learner.model for learner in learners]
    record["compiled"] = [learner.compiled for learner in learners]
    return record
