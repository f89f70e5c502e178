"""Seconds per training step (forward + backward) with ReGATE, against the standard loss.

    python benchmarks/regate_step.py [--steps 10] [--threads 2] [--answer 192] [--json out.json]

A random-weight LLaVA (``vlmopt.llava_config`` with a wider, deeper LM) on a synthetic
batch whose rows end in an ``--answer``-token labelled span (long answers: where ReGATE's elision
pays). Every step is sparse (no warm-up, no dense steps) with ``keep=0.5``, so the numbers compare
one sparse step of each kind, taking turns: the standard loss, ReGATE gating the loss only (``elide=False``: the
full forward), and ReGATE eliding the inactive tokens from the decoder (``elide=True``). Medians
after two warm-up steps; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import vlmopt
from vlmopt import configs
from vlmopt.adapters.llava import llava_config


def batch_and_labels(model, answer: int, rows: int, seed: int = 0):
    specs = [configs.PromptSpec(text_before=8, text_after=answer + 8 + row) for row in range(rows)]
    batch = configs.synthetic_batch(model, specs, seed=seed)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -answer:] = batch["input_ids"][:, -answer:]
    return batch, labels


def step_seconds(settings: dict, model, batch, labels, steps: int) -> dict[str, dict]:
    """Median seconds per step and mean tokens in the loss of each setting, the settings taking
    turns step by step (so a change in the machine's load hits them alike)."""
    compiled = {name: vlmopt.compile(model, passes, mode="train") for name, passes in settings.items()}
    teacher = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    times = {name: [] for name in settings}
    tokens = {name: [] for name in settings}
    for _ in range(steps + 2):
        for name, opt in compiled.items():
            begin = time.perf_counter()
            out = opt(**batch, labels=labels, sample_ids=list(range(labels.shape[0])), teacher_losses=teacher)
            out.loss.backward()
            times[name].append(time.perf_counter() - begin)
            tokens[name].append(int(out.active_tokens.sum()))
            model.zero_grad(set_to_none=True)
    return {
        name: {"median_step_s": statistics.median(times[name][2:]), "tokens_in_loss": statistics.mean(tokens[name])}
        for name in settings
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--answer", type=int, default=192, help="labelled answer tokens per row")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = configs.build(llava_config(text_hidden=256, text_layers=6, text_heads=8, kv_heads=4, vocab_size=512), seed=0)
    batch, labels = batch_and_labels(model, args.answer, args.rows)
    sparse = {"keep": 0.5, "warmup_steps": 0, "dense_steps": 0}
    settings = {
        "standard": [],
        "regate keep=0.5": [vlmopt.passes.ReGATE(**sparse)],
        "regate keep=0.5 elide": [vlmopt.passes.ReGATE(**sparse, elide=True)],
    }
    rows = step_seconds(settings, model, batch, labels, args.steps)
    base = rows["standard"]["median_step_s"]
    for row in rows.values():
        row["time_ratio"] = row["median_step_s"] / base
    result = {"threads": args.threads, "steps_timed": args.steps, "answer_tokens": args.answer, "rows": args.rows,
              "sequence": labels.shape[1], "settings": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
