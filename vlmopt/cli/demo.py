"""``vlmopt demo``: compile a model with and without passes, and compare them on one prompt."""

from __future__ import annotations

import argparse

from vlmopt.cli.common import add_model_argument, add_passes_argument, load_model, markdown_table, pass_lists

DEFAULT_PASSES = ["random_prune:keep_ratio=0.5", "pool_prune:keep_ratio=0.25"]


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="compare a model with and without passes on one prompt")
    add_model_argument(parser, default="tiny-llava-random")
    add_passes_argument(parser)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed prefill repeats")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import vlmopt
    from vlmopt import configs
    from vlmopt.measure import prefill_runner, time_prefill, visual_tokens

    loaded = load_model(args.model)
    model = loaded.model
    batch = configs.synthetic_batch(model, [configs.PromptSpec(text_before=6, text_after=16)], seed=0)
    lists = [[]] + pass_lists(args.passes or DEFAULT_PASSES)
    rows = []
    for passes in lists:
        compiled = vlmopt.compile(model, passes=passes)
        total, kept = visual_tokens(compiled, batch)
        report = vlmopt.flops(compiled, batch)
        timing = time_prefill(prefill_runner(compiled, batch), repeats=args.repeats)
        ids = compiled.generate(**batch, max_new_tokens=args.max_new_tokens)
        new = ids[0, batch["input_ids"].shape[1] :].tolist()
        text = loaded.processor.decode(new) if loaded.processor is not None else " ".join(map(str, new))
        rows.append([" + ".join(passes) or "(none)", f"{kept} / {total}", report.total / 1e9, timing.median_s * 1e3, text])
    print(f"model: {args.model} ({type(model).__name__}, random weights: generated tokens are ids)"
          if loaded.processor is None else f"model: {args.model}")
    print(markdown_table(["passes", "visual tokens", "prefill GFLOPs", "prefill ms", "generated"], rows))
    return 0
