"""The training loop (:func:`train`) and what it writes at the end (:func:`finish`): the model
directory with ``tasks.json``, ``eval.json`` and the model card."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from models.train import resume
from models.train.build import build_model
from models.train.checkpoint import recorded_commands, start_from
from models.train.config import TASK_CONFIGS, TrainConfig, train_command
from models.train.governor import ThreadGovernor
from models.train.schedule import lr_at, phase_task, step_plan, training_batch
from models.train.step import LossWindow, Run
from vlmopt.reference import processing, tasks


def train(cfg: TrainConfig, out_dir: Path, log=print) -> dict:
    """Train, evaluate and write the model directory; returns the ``eval.json`` dict. The run saves its
    state every ``cfg.checkpoint_every`` steps under ``out_dir`` and, started again with the same
    configuration, continues from there (:mod:`models.train.resume`)."""
    from vlmopt.reference.evaluate import evaluate

    out_dir = Path(out_dir)
    governor = ThreadGovernor(cfg.threads, log)
    began = time.time()
    model, processor, arch = build_model(cfg.model, cfg.seed, cfg.rope_theta, cfg.mrope_interleaved, cfg.lm_layers)
    checkpoint = resume.read(out_dir, cfg)
    base_commands: list[str] = []
    if cfg.init_from and checkpoint is None:
        start_from(model, Path(cfg.init_from))
        base_commands = recorded_commands(Path(cfg.init_from))  # read now: the run may overwrite that directory
        log(f"weights from {cfg.init_from}")
    task_cfgs = TASK_CONFIGS[cfg.model]
    task_objs = {name: tasks.TASKS[name](c) for name, c in task_cfgs.items()}
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.model}: {n_params / 1e6:.2f}M parameters; {cfg}")

    run = Run.start(model, cfg)
    if checkpoint is None:
        progress = resume.Progress(cursors={name: 0 for name in task_objs}, base_commands=base_commands)
    else:
        progress = resume.restore(checkpoint, model, run)
        began -= progress.seconds
        log(f"resuming from step {progress.step} ({resume.state_path(out_dir)})")
    plan = step_plan(cfg)
    cursors, history = progress.cursors, progress.history
    model.train()
    window = LossWindow()
    for step, task_name in enumerate(plan):
        if step < progress.step:
            continue
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        if step % 10 == 0:
            governor.update()
        task = task_objs[task_name]
        if task_name == "shapes":
            task = phase_task(task, step, cfg)
        batch_samples = training_batch(task, cfg, cursors[task_name])
        cursors[task_name] += len(batch_samples)
        window.add(*run.step(model, processor, batch_samples, step))
        if (step + 1) % 25 == 0:
            log(f"step {step + 1}/{cfg.steps} lr {lr_at(step, cfg):.2e} {window.report((time.time() - began) / 60)}")
            window = LossWindow()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            point = {"step": step + 1, "minutes": round((time.time() - began) / 60, 2)}
            for name, t in task_objs.items():
                if t.video and step < cfg.video_from:
                    continue
                r = evaluate(model, processor, t, "validation", n=cfg.eval_n, batch_size=16 if not t.video else 8)
                point[name] = round(r.accuracy, 4)
                families = ", ".join(f"{f} {100 * a:.0f}%" for f, a in r.per_family.items())
                log(f"validation {name} at step {step + 1}: {100 * r.accuracy:.1f}% ({families})")
            history.append(point)
            model.train()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            progress.step, progress.seconds = step + 1, time.time() - began
            resume.save(out_dir, cfg, model, run, progress)
    run.taps.remove()
    train_seconds = time.time() - began
    model.eval()
    results = finish(cfg, model, processor, arch, task_objs, out_dir, train_seconds, history, n_params, progress.base_commands, log)
    resume.remove(out_dir)
    return results


def finish(cfg, model, processor, arch, task_objs, out_dir: Path, train_seconds, history, n_params, base_commands, log) -> dict:
    """Save the model directory, then evaluate it and write ``eval.json`` and ``README.md``
    (``base_commands``: the commands that trained the ``--init-from`` weights, first stage first; [] for none)."""
    from vlmopt.reference.evaluate import evaluate

    began = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processing.save_processor(processor, out_dir)
    (out_dir / "tasks.json").write_text(
        json.dumps({name: dataclasses.asdict(t.config) for name, t in task_objs.items()}, indent=2) + "\n"
    )
    # evaluate what was written, loaded back the way users load it
    from vlmopt.reference import load

    model, processor = load(out_dir)
    results: dict = {
        "model": cfg.model,
        "train_command": train_command(cfg),
        "init_from_commands": base_commands,
        "train_config": dataclasses.asdict(cfg),
        "arch": dataclasses.asdict(arch),
        "parameters": n_params,
        "train_minutes": round(train_seconds / 60, 2),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "history": history,
        "test": {},
    }
    for name, t in task_objs.items():
        bs = 16 if not t.video else 8
        r = evaluate(model, processor, t, "test", n=cfg.test_n, batch_size=bs)
        log(f"test {name}: {r.accuracy:.3f} {r.per_family} ({r.seconds:.0f} s)")
        entry = {"full": r.summary()}
        if name == "shapes":
            c = evaluate(model, processor, t, "test", n=cfg.test_n, batch_size=bs, text_only=True)
            log(f"text-only {name}: {c.accuracy:.3f} {c.per_family}; majority {c.majority['overall']:.3f}")
            entry["text_only"] = c.summary()
        n_fixed = 16 if t.video else 32  # the set tests/reference re-checks (kept small: the tests must be fast)
        small = evaluate(model, processor, t, "test", n=n_fixed, batch_size=n_fixed)
        entry["fixed"] = {**small.summary(), "predictions": small.predictions, "correct": small.correct}
        results["test"][name] = entry
    results["eval_minutes"] = round((time.time() - began) / 60, 2)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    from models.card import write_card

    write_card(out_dir, results)
    return results
