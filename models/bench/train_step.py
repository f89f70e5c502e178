"""Seconds per optimiser step of a reference model's training preset, per kind of step.

    python -m models.bench.train_step --model tiny-llava [--steps 20] [--threads 2] [--json out.json]

Runs the preset's own training step (:meth:`models.train.Run.step`: losses, backward,
clipping, AdamW) on fresh weights for ``--steps`` steps of each task the preset trains on
(``shapes``; the Qwen models also ``shapes-video`` and ``needle``, with their batch sizes), after two
warm-up steps, and reports the median. With the preset's step plan it estimates the training time of a full run (validation and the
final evaluation not included). Run it on an otherwise idle machine: a second busy process on a
2-core CPU slows every step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from models import train as recipe
from vlmopt.reference import tasks


def step_seconds(name: str, steps: int, threads: int) -> dict[str, float]:
    """Median seconds per step of each task of ``name``'s preset."""
    torch.set_num_threads(threads)
    cfg = recipe.PRESETS[name]
    model, processor, _ = recipe.build_model(name, cfg.seed, cfg.rope_theta, cfg.mrope_interleaved, cfg.lm_layers)
    run = recipe.Run.start(model, cfg)
    model.train()
    medians = {}
    for task_name, task_config in recipe.TASK_CONFIGS[name].items():
        task = tasks.TASKS[task_name](task_config)
        times, cursor = [], 0
        for _ in range(steps + 2):
            begin = time.perf_counter()
            batch = recipe.training_batch(task, cfg, cursor)
            cursor += len(batch)
            run.step(model, processor, batch, cfg.position_aids_from)  # every aid on, as most of a run
            times.append(time.perf_counter() - begin)
        medians[task_name] = statistics.median(times[2:])
    run.taps.remove()
    return medians


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m models.bench.train_step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(recipe.PRESETS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per task (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be at least 1")
    medians = step_seconds(args.model, args.steps, args.threads)
    plan = recipe.step_plan(recipe.PRESETS[args.model])
    minutes = sum(medians[task] for task in plan) / 60
    result = {"model": args.model, "threads": args.threads, "steps_timed": args.steps,
              "seconds_per_step": {k: round(v, 3) for k, v in medians.items()},
              "preset_steps": len(plan), "estimated_training_minutes": round(minutes, 1)}
    for task, seconds in medians.items():
        print(f"{args.model} {task}: {seconds:.2f} s/step (median of {args.steps}, {args.threads} threads)")
    print(f"{len(plan)} preset steps: about {minutes:.1f} min of training (validation and evaluation not included)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
