"""``vlmopt analyze stages``: HalfV's per-layer stage analysis (visual entropy, marginal utility of pruning)."""

from __future__ import annotations

import argparse
import json

from vlmopt.cli.common import add_model_argument, positive_int, reference_task


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help="analyses that guide where passes act")
    kinds = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    stages = kinds.add_parser("stages", help="per LLM layer: visual-token entropy and the marginal utility of pruning")
    add_model_argument(stages, default="tiny-llava")
    stages.add_argument("--task", default="shapes", help="task name (shapes, shapes-video, needle)")
    stages.add_argument("--n", type=positive_int, default=100, help="number of samples (from the validation split)")
    stages.add_argument("--keep", type=float, default=0.25, help="visual tokens kept by each probe cut, in (0, 1]")
    stages.add_argument("--batch-size", type=positive_int, default=16)
    stages.add_argument("--plot", help="draw both curves to this PNG (needs matplotlib)")
    stages.add_argument("--json", help="write the curves and suggestions to this file")
    stages.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlmopt.analysis.stages import analyze_stages, plot_stages
    from vlmopt.cli.common import load_model
    from vlmopt.errors import InputError

    task = reference_task(args.model, args.task)  # checked before the weights load
    loaded = load_model(args.model)
    if loaded.processor is None:
        raise InputError(f"{args.model} has no processor; analyze stages needs a reference model or a local checkpoint")
    samples = task.samples("validation", n=args.n)
    report = analyze_stages(loaded.model, loaded.processor, samples, keep=args.keep, batch_size=args.batch_size)
    print(f"{args.model} on {args.task}, n={args.n} (validation split); baseline accuracy {100 * report.baseline_accuracy:.1f}%")
    print("| layer | visual entropy | accuracy with cut % | marginal utility |")
    print("|---|---|---|---|")
    for layer, entropy in enumerate(report.entropy):
        accuracy, utility = report.accuracy[layer], report.utility[layer]
        cells = ("—", "—") if accuracy is None else (f"{100 * accuracy:.1f}", f"{utility:.3f}")
        print(f"| {layer} | {entropy:.3f} | {cells[0]} | {cells[1]} |")
    print(f"suggested: HalfV(ivr_layer={report.ivr_layer}, ssr_layer={report.ssr_layer})")
    if args.plot:
        plot_stages(report, args.plot, f"{args.model} — {args.task} (n={args.n})")
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "task": args.task, "n": args.n, **report.summary()}, handle, indent=2)
    return 0
