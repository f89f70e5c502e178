"""``vlmopt regate precompute``: cache a frozen text-only teacher's per-token losses for ReGATE."""

from __future__ import annotations

import argparse

from vlmopt.cli.common import add_model_argument, positive_int, reference_task


def add_parsers(subparsers) -> None:
    from vlmopt.passes.regate import TEACHERS, ReGATE

    regate = subparsers.add_parser("regate", help="ReGATE training helpers")
    actions = regate.add_subparsers(dest="action", required=True, metavar="ACTION")
    precompute = actions.add_parser(
        "precompute",
        help="cache the teacher losses of a task's training samples, keyed by sample id (the sample index)",
        description="The teacher is the model as it is now (run this before fine-tuning), seeing the picture as --teacher "
        "says: pad (its language model, the visual tokens replaced by padding, positions kept), blank (the whole "
        "model on a uniform grey picture) or drop (its language model, the visual tokens removed). Samples are the "
        "task's training split, indices start .. start+n-1, encoded with their answers (the fine-tuning format).",
    )
    add_model_argument(precompute, required=True)
    precompute.add_argument("--task", required=True, help="task name (see vlmopt.reference.TASK_NAMES)")
    precompute.add_argument("--n", type=positive_int, required=True, help="number of training samples")
    precompute.add_argument("--start", type=int, default=0, help="first sample index (default 0)")
    precompute.add_argument("--split", default="train", choices=["train", "validation", "test"])
    precompute.add_argument("--batch-size", type=positive_int, default=16)
    precompute.add_argument("--teacher", choices=sorted(TEACHERS), default=ReGATE.teacher,
                            help=f"what the teacher sees of the picture (default {ReGATE.teacher}, ReGATE's default)")
    precompute.add_argument("--out", required=True, help="where to write the cache (torch.save file)")
    precompute.set_defaults(run=run_precompute)


def run_precompute(args: argparse.Namespace) -> int:
    from vlmopt import reference
    from vlmopt.cli.common import load_model
    from vlmopt.errors import VlmoptError
    from vlmopt.passes.regate import TEACHERS
    from vlmopt.train import TeacherCache, teacher_losses

    task = reference_task(args.model, args.task)  # the task first: it needs no weights
    loaded = load_model(args.model)
    if loaded.processor is None:
        raise VlmoptError(f"{args.model!r} has no processor: precompute needs a reference model or a checkpoint")
    samples = task.samples(args.split, n=args.n, start=args.start)
    cache = TeacherCache(meta={"model": str(args.model), "task": args.task, "split": args.split, "teacher": args.teacher})
    for begin in range(0, len(samples), args.batch_size):
        chunk = list(samples[begin : begin + args.batch_size])
        batch = reference.processing.encode(loaded.processor, chunk, answers=True)
        seen = reference.processing.encode(loaded.processor, [s.text_only() for s in chunk], answers=True) if args.teacher == "blank" else batch
        cache.add([s.index for s in chunk], batch["labels"], teacher_losses(loaded.model, seen, visual=TEACHERS[args.teacher]))
    cache.save(args.out)
    tokens = sum(v.numel() for v in cache.losses.values())
    print(f"wrote teacher losses of {len(cache)} samples ({tokens} answer tokens) to {args.out}")
    return 0
