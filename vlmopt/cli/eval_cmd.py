"""``vlmopt eval``: accuracy, retention, loyalty, visual tokens, FLOPs and time of pass lists on a task."""

from __future__ import annotations

import argparse
import json

from vlmopt.cli.common import (
    add_model_argument,
    add_passes_argument,
    check_task,
    reference_task,
    load_model,
    markdown_table,
    pass_lists,
    positive_int,
    unit_fraction,
)


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate pass lists against the unpruned model on a task")
    add_model_argument(parser, default="tiny-llava")
    add_passes_argument(parser)
    parser.add_argument("--task", default="shapes", help="task name (shapes, shapes-video, needle)")
    parser.add_argument("--n", type=positive_int, default=500, help="number of test samples")
    parser.add_argument("--samples", dest="n", type=positive_int, help="the same as --n (under torchrun, which reads --n as its own)")
    parser.add_argument("--seed", type=int, help="draw a fresh test set from this seed (default: the recorded split)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument(
        "--sweep", action="append",
        help="vary a field of the passes that have it, e.g. keep_ratio=0.5,1/3 (repeatable: one per field)",
    )
    parser.add_argument("--stream-budget", type=unit_fraction,
                        help="with a stream pass (hermes, streaming_llm, snapkv): each video's KV budget as this "
                        "fraction of its visual tokens, e.g. 0.32")
    parser.add_argument("--plot", help="draw accuracy against FLOPs to this PNG (needs matplotlib)")
    parser.add_argument("--json", help="write the results to this file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlmopt.distributed.group import init_from_env, is_rank_zero
    from vlmopt.errors import InputError
    from vlmopt.evaluation import evaluate, plot, sweep_lists

    # Everything that can be checked without the weights is checked before loading them.
    check_task(args.task)
    lists = sweep_lists(pass_lists(args.passes), args.sweep)
    if args.plot:
        from vlmopt.plots import pyplot

        pyplot()  # a missing matplotlib is told before the evaluation runs
    task = reference_task(args.model, args.task)
    loaded = load_model(args.model)
    if loaded.processor is None:
        raise InputError(f"{args.model} has no processor; eval needs a reference model or a local checkpoint")
    samples = task.samples("test", n=args.n, seed=args.seed)
    # Under torchrun (APB-V's hosts as ranks) every rank runs the same batches and rank 0 alone
    # writes the results.
    init_from_env()
    report = evaluate(
        loaded.model, loaded.processor, samples, lists, batch_size=args.batch_size, progress=is_rank_zero(),
        stream_budget=args.stream_budget,
    )
    if not is_rank_zero():
        return 0
    source = "recorded test split" if args.seed is None else f"fresh samples, seed {args.seed}"
    print(f"{args.model} on {args.task}, n={args.n} ({source})")
    print(report_table(report))
    if args.plot:
        plot(report, args.plot, f"{args.model} — {args.task} (n={args.n})")
        print(f"wrote {args.plot}")
    if args.json:
        payload = {"model": args.model, "task": args.task, "n": args.n, "seed": args.seed,
                   "stream_budget": args.stream_budget,
                   "baseline": report["baseline"].summary() | {"answers": report["baseline"].answers},
                   "runs": [r.summary() | {"answers": r.answers} for r in report["runs"]]}
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2)
    return 0


def report_table(report: dict) -> str:
    """The Markdown table of an :func:`vlmopt.evaluation.evaluate` report, baseline first."""
    rows = []
    for result in [report["baseline"]] + report["runs"]:
        rows.append([
            result.passes or "(none)", f"{100 * result.accuracy:.1f}", f"{100 * result.retention:.1f}",
            f"{100 * result.retention_ci[0]:.1f}–{100 * result.retention_ci[1]:.1f}", f"{result.lost} / {result.gained}",
            f"{100 * result.loyalty:.1f}", f"{result.visual_tokens:.0f}", f"{result.prefill_flops / 1e9:.3f}",
            f"{result.llm_prefill_flops / 1e9:.3f}", f"{result.prefill_seconds * 1e3:.1f}",
        ])
    return markdown_table(
        ["passes", "accuracy %", "retention %", "retention 95% CI", "lost / gained", "loyalty %", "visual tokens", "prefill GFLOPs", "LLM GFLOPs", "prefill ms"],
        rows,
    )
