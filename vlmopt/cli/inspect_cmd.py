"""``vlmopt inspect`` and ``vlmopt diff``: print a model's pipeline graphs, or what passes change."""

from __future__ import annotations

import argparse

from vlmopt.cli.common import add_model_argument, add_passes_argument, load_model, pass_lists


def add_parsers(subparsers) -> None:
    inspect = subparsers.add_parser("inspect", help="print the pipeline graphs of a model (after passes)")
    add_model_argument(inspect)
    add_passes_argument(inspect)
    inspect.add_argument(
        "--stage", choices=["prefill", "prefill_text", "decode", "train_prefill", "train_text", "all"], default="prefill",
        help="train_prefill / train_text: the training graphs (with --mode train)",
    )
    _add_mode(inspect)
    inspect.add_argument("--code", action="store_true", help="print the generated Python instead of the node table")
    inspect.set_defaults(run=run_inspect)

    diff = subparsers.add_parser("diff", help="print what a pass list changes in a model's graphs")
    add_model_argument(diff)
    add_passes_argument(diff)
    _add_mode(diff)
    diff.set_defaults(run=run_diff)


def _add_mode(parser) -> None:
    parser.add_argument(
        "--mode", choices=["infer", "train"], default="infer",
        help="train: also capture the training graphs (train-stage passes such as regate need it)",
    )


def _compiled(args):
    import vlmopt

    loaded = load_model(args.model)
    lists = pass_lists(args.passes) or [[]]
    return loaded, vlmopt.compile(loaded.model, passes=lists[0], mode=args.mode)


def run_inspect(args: argparse.Namespace) -> int:
    from vlmopt.graph.diff import format_node

    _, compiled = _compiled(args)
    stages = list(compiled.graph.stages) if args.stage == "all" else [args.stage]
    if any(stage not in compiled.graph.stages for stage in stages):
        from vlmopt.errors import InputError

        raise InputError(f"stage {args.stage} is a training graph: add --mode train")
    for stage in stages:
        module = compiled.graph[stage]
        print(f"# stage: {stage} ({len(module.graph.nodes)} nodes; passes: {compiled.describe_passes()})")
        if args.code:
            print(module.code.strip())
        else:
            for node in module.graph.nodes:
                print(f"  {format_node(node)}")
    return 0


def run_diff(args: argparse.Namespace) -> int:
    import vlmopt

    loaded, compiled = _compiled(args)
    print(vlmopt.graph.diff(vlmopt.compile(loaded.model, mode=args.mode).graph, compiled.graph), end="")
    return 0
