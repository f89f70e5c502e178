"""``vlmopt tasks export``: write a reference task as an offline lmms-eval task.

    vlmopt tasks export --task shapes --n 200 --out lmms_tasks/
    python -m lmms_eval --model vlmopt --model_args pretrained=tiny-llava,passes=hiprune:keep_ratio=1/3 \\
        --include_path lmms_tasks/ --tasks vlmopt_shapes --batch_size 16

Needs the ``datasets`` package (``pip install "vlmopt[lmms]"``).
"""

from __future__ import annotations

import argparse

from vlmopt.cli.common import positive_int


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("tasks", help="reference tasks for other harnesses (lmms-eval)")
    verbs = parser.add_subparsers(dest="tasks_command", required=True, metavar="VERB")
    export = verbs.add_parser("export", help="write a reference task as an offline lmms-eval task (dataset + YAML + scorer)")
    export.add_argument("--task", required=True, help="shapes, shapes-video or needle")
    export.add_argument("--n", type=positive_int, default=500, help="number of test samples (the recorded split: indices 0..n-1)")
    export.add_argument("--seed", type=int, help="draw the samples from this seed instead (as vlmopt eval --seed)")
    export.add_argument("--model", default="tiny-llava",
                        help="reference model whose task configuration to use (tiny-llava: shapes; tiny-qwen25vl: all)")
    export.add_argument("--name", help="lmms-eval task name (default: vlmopt_<task>, e.g. vlmopt_shapes)")
    export.add_argument("--out", required=True, help="directory for the dataset, the YAML and utils.py")
    export.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from vlmopt.integrations.lmms_eval import tasks

    path = tasks.export(args.task, args.n, args.out, model=args.model, seed=args.seed, name=args.name)
    name = path.stem
    print(f"wrote {path} ({args.n} samples of {args.task} as {args.model} sees it)")
    print(f"run: python -m lmms_eval --model vlmopt --model_args pretrained={args.model} "
          f"--include_path {path.parent} --tasks {name} --batch_size 16")
    return 0
