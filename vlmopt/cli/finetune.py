"""``vlmopt finetune``: fine-tune a reference model on a task with the compiled training graph,
standard and with train-stage passes (ReGATE) side by side.

    vlmopt finetune --model tiny-llava --task shapes-captions --steps 1000 --patience 4 --check-n 64 \\
        --passes none --passes regate --passes regate:elide=true --checkpoint ft.state --json ft.json --plot ft.png

Each ``--passes`` value is one run (``none``: standard fine-tuning; no ``--passes``: one standard
run); the runs train fresh copies of the model in lockstep on the same batches (see
:mod:`vlmopt.train.finetune`); with ``--patience`` each stops when its validation score plateaus.
Printed (:mod:`vlmopt.train.finetune_report`): per run its peak score, the step and seconds at which
it first reaches the standard run's peak, the tokens in the loss there and in all, the median
seconds per step, the one-word check and the test score.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from vlmopt.cli.common import add_model_argument, markdown_table, positive_int, whole_number_at_least

STANDARD = ("none", "standard")
"""``--passes`` values that mean standard fine-tuning (no pass)."""


def positive_float(text: str) -> float:
    """``argparse`` type of rates: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


non_negative_int = whole_number_at_least(0)
"""``argparse`` type of counts that may be 0."""


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a reference model on a task, standard and with training passes (ReGATE)",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    add_model_argument(parser, required=True)
    parser.add_argument("--task", required=True, help="task name, e.g. shapes-captions (the shapes pictures described in sentences)")
    parser.add_argument("--steps", type=positive_int, required=True, help="optimiser steps per run at most")
    parser.add_argument("--passes", action="append", default=[], metavar="SPEC",
                        help="one run's training passes, e.g. 'regate:keep=0.25' (none: standard); repeat to compare runs")
    parser.add_argument("--lr", type=positive_float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    parser.add_argument("--lr-warmup", type=non_negative_int, default=10, help="learning-rate warm-up steps (default 10)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="samples per step (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="data order, extra turns and torch seed (default 0)")
    parser.add_argument("--turns", type=non_negative_int, default=8, help="extra question turns per picture (default 8)")
    parser.add_argument("--train-n", type=positive_int, help="training samples, cycled in epochs (default: steps × batch size)")
    parser.add_argument("--eval-every", type=positive_int, default=50, help="validation accuracy every K steps (default 50)")
    parser.add_argument("--eval-n", type=positive_int, default=100, help="validation samples per evaluation (default 100)")
    parser.add_argument("--test-n", type=non_negative_int, default=500, help="test samples for the final models (default 500; 0: none)")
    parser.add_argument("--eval-batch-size", type=positive_int, default=32, help="samples per generate() batch (default 32)")
    parser.add_argument("--patience", type=positive_int,
                        help="stop a run after this many evaluations without a new best validation score (default: never)")
    parser.add_argument("--each-to-its-plateau", action="store_true",
                        help="with --patience, each run stops at its own plateau (default: all stop when the standard run plateaus)")
    parser.add_argument("--min-delta", type=float, default=0.0, help="the least rise that counts as a new best (default 0)")
    parser.add_argument("--check-n", type=non_negative_int, default=0,
                        help="validation samples of the model's one-word task (the pictures' base task) per evaluation: is it forgotten? (default 0)")
    parser.add_argument("--checkpoint", help="write the whole state to this file every --checkpoint-every steps; the same command resumes from it")
    parser.add_argument("--checkpoint-every", type=positive_int, default=25, help="steps between checkpoints (default 25)")
    parser.add_argument("--json", help="write the curves and results to this file")
    parser.add_argument("--plot", help="draw validation accuracy against tokens in the loss to this PNG (needs matplotlib)")
    parser.add_argument("--out", help="save each fine-tuned model (and its ReGATE state) under this directory, one folder per run")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's; 1 is fastest on a crowded machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _runs(specs: list[str]):
    """(label, passes) per ``--passes`` value, every spec parsed now (before any weights load)."""
    from vlmopt import passes
    from vlmopt.errors import InputError
    from vlmopt.train.finetune import Run

    runs = []
    for spec in specs or ["none"]:
        label = spec.strip()
        if label in STANDARD:
            runs.append(Run("standard", []))
            continue
        parts = [part for part in label.split("+") if part.strip()]
        if not parts:
            raise InputError(f"--passes {spec!r} names no pass; give a spec such as regate:keep=0.5, or none for standard fine-tuning")
        runs.append(Run(label, [passes.parse(part) for part in parts]))
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise InputError(f"--passes lists the same run twice ({', '.join(labels)}); give each run once")
    return runs


def run(args: argparse.Namespace) -> int:
    from vlmopt.cli.common import check_task, load_model, reference_task
    from vlmopt.errors import InputError
    from vlmopt.plots import pyplot
    from vlmopt.train.finetune import FinetuneConfig, finetune
    from vlmopt.train.finetune_report import plot, summarize, table

    # Everything that can be checked without the weights is checked before loading them.
    check_task(args.task)
    runs = _runs(args.passes)
    if args.train_n is not None and args.train_n < args.batch_size:
        raise InputError(f"--train-n {args.train_n} is smaller than --batch-size {args.batch_size}; give at least one batch of samples")
    if args.plot:
        pyplot()  # a missing matplotlib is told before the weights load
    task = reference_task(args.model, args.task)
    if task.video:
        raise InputError(f"finetune trains on image tasks; {args.task!r} is a video task (use shapes-captions, shapes-relations or shapes)")
    check = reference_task(args.model, getattr(task, "base", task.name)) if args.check_n else None
    config = FinetuneConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_warmup=args.lr_warmup, seed=args.seed, turns=args.turns,
        train_n=args.train_n, eval_every=args.eval_every, eval_n=args.eval_n, test_n=args.test_n,
        eval_batch_size=args.eval_batch_size, patience=args.patience, min_delta=args.min_delta, check_n=args.check_n,
        follow_reference=not args.each_to_its_plateau,
    )

    def load():
        loaded = load_model(args.model)
        if loaded.processor is None:
            raise InputError(f"{args.model} has no processor; finetune needs a reference model or a local checkpoint")
        return loaded.model, loaded.processor

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    record = finetune(load, task, runs, config, progress=not args.quiet, check=check, checkpoint=args.checkpoint,
                      checkpoint_every=args.checkpoint_every)
    models, compiled = record.pop("models"), record.pop("compiled")
    record["model"] = args.model
    record["summary"] = summary = summarize(record)
    headers, rows = table(summary)
    headers.append(f"test score % (n={args.test_n})")
    for row, result in zip(rows, record["runs"]):
        row.append(f"{100 * result['test']['accuracy']:.1f}" if result.get("test") else "")
    before = record.get("before")
    print(f"{args.model} fine-tuned on {args.task}: at most {args.steps} steps × {args.batch_size} samples, seed {args.seed}"
          + (f"; untouched model {100 * before['accuracy']:.1f}% on the test samples" if before else ""))
    print(markdown_table(headers, rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(record, args.plot, f"{args.model} fine-tuned on {args.task} (seed {args.seed}; dashed: the standard run's peak)")
        print(f"wrote {args.plot}")
    if args.checkpoint and (args.json or args.out):
        Path(args.checkpoint).unlink(missing_ok=True)  # the results are written: nothing left to resume
    if args.out:
        _save(Path(args.out), args.model, runs, models, compiled)
    return 0


_NOT_COPIED = {"config.json", "generation_config.json", "README.md", "TRAINING.md", "eval.json"}
"""Files of the source model directory that describe the source model, not the fine-tuned one."""


def _save(out: Path, name: str, runs, models, compiled) -> None:
    """Each run's model in ``out/<label>/`` (HF files, processor files and tasks.json copied from the
    source directory, and ``vlmopt_pass_states.pt`` when a pass has a state)."""
    import re

    import torch

    from vlmopt.cli.common import model_directory

    source = model_directory(name)
    for run, model, graph in zip(runs, models, compiled):
        folder = out / re.sub(r"[^A-Za-z0-9_.=-]+", "_", run.label)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, safe_serialization=True)
        for file in source.iterdir() if source is not None else ():  # a random-weight config has no directory
            if file.is_file() and file.name not in _NOT_COPIED and not file.name.startswith("model"):
                shutil.copy(file, folder / file.name)
        states = graph.pass_states.get_extra_state()
        if states:
            torch.save(states, folder / "vlmopt_pass_states.pt")
        print(f"wrote {folder}")
