"""``vlmopt demo``: compile a model with and without passes, and compare them.

On a reference model (``tiny-llava``, the default once its weights are in ``models/``): a few test
questions answered with and without each pass list, then the evaluation table on ``--n`` test
samples. On a random-weight config (the default otherwise): one synthetic prompt, with visual
tokens, prefill FLOPs, prefill time and the generated token ids.
"""

from __future__ import annotations

import argparse

from vlmopt.cli.common import (
    add_model_argument,
    add_passes_argument,
    load_model,
    markdown_table,
    pass_lists,
    positive_int,
)

DEFAULT_PASSES = ["random_prune:keep_ratio=0.5", "pool_prune:keep_ratio=0.25"]
REFERENCE_PASSES = ["hiprune:keep_ratio=1/3", "random_prune:keep_ratio=1/3", "pool_prune:keep_ratio=1/3"]


def default_model() -> str:
    """``tiny-llava`` where its weights are shipped, else the random-weight ``tiny-llava-random`` (saying
    where the reference models were looked for and how to point at them)."""
    import sys

    from vlmopt import reference

    try:
        reference.path("tiny-llava")
    except Exception:  # noqa: BLE001 - any failure to find the weights means: use the random config
        print(
            f"no reference model in {reference.models_dir()}: the reference models (tiny-llava, tiny-qwen25vl) are in "
            "the models/ directory of a vlmopt checkout; pass --model <that directory>/tiny-llava or set "
            "VLMOPT_MODELS=<that directory>. Using the random-weight tiny-llava-random instead.",
            file=sys.stderr,
        )
        return "tiny-llava-random"
    return "tiny-llava"


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="compare a model with and without passes on one prompt")
    add_model_argument(parser, default=None, required=False)
    add_passes_argument(parser)
    parser.add_argument("--questions", type=positive_int, default=4, help="reference models: test questions shown one by one")
    parser.add_argument("--n", type=positive_int, default=100, help="reference models: test samples in the evaluation table")
    parser.add_argument("--max-new-tokens", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed prefill repeats")
    parser.set_defaults(run=run)


def run_reference(args: argparse.Namespace, loaded) -> int:
    """Questions from the model's test split, answered with and without passes; then the eval table."""
    import vlmopt
    from vlmopt import reference
    from vlmopt.cli.eval_cmd import report_table
    from vlmopt.evaluation import evaluate
    from vlmopt.reference import evaluate as reference_eval

    lists = [[]] + pass_lists(args.passes or REFERENCE_PASSES)
    task = reference.task_for(args.model, "shapes")
    shown = task.samples("test", n=args.questions)
    answers = [reference_eval.predict(vlmopt.compile(loaded.model, passes=passes), loaded.processor, shown) for passes in lists]
    rows = [[s.question, s.answer, *(a[i].strip() for a in answers)] for i, s in enumerate(shown)]
    print(f"model: {args.model}, {args.questions} questions from the shapes test split")
    print(markdown_table(["question", "truth", *(" + ".join(p) or "(none)" for p in lists)], rows))
    report = evaluate(loaded.model, loaded.processor, task.samples("test", n=args.n), lists[1:], progress=False)
    print(f"\n{args.model} on shapes, n={args.n} (recorded test split); `vlmopt eval` gives more")
    print(report_table(report))
    return 0


def run(args: argparse.Namespace) -> int:
    import vlmopt
    from vlmopt import configs
    from vlmopt.measure import measure, prefill_runner, visual_tokens

    args.model = args.model or default_model()
    pass_lists(args.passes)  # an unknown pass or a bad option fails before the model loads
    loaded = load_model(args.model)
    if not loaded.random:
        return run_reference(args, loaded)
    model = loaded.model
    batch = configs.synthetic_batch(model, [configs.PromptSpec(text_before=6, text_after=16)], seed=0)
    lists = [[]] + pass_lists(args.passes or DEFAULT_PASSES)
    rows = []
    for passes in lists:
        compiled = vlmopt.compile(model, passes=passes)
        total, kept = visual_tokens(compiled, batch)
        report = vlmopt.flops(compiled, batch)
        timing = measure(prefill_runner(compiled, batch), repeats=args.repeats)
        ids = compiled.generate(**batch, max_new_tokens=args.max_new_tokens)
        new = ids[0, batch["input_ids"].shape[1] :].tolist()
        text = loaded.processor.decode(new) if loaded.processor is not None else " ".join(map(str, new))
        rows.append([" + ".join(passes) or "(none)", f"{kept} / {total}", report.total / 1e9, timing.median_s * 1e3, text])
    print(f"model: {args.model} ({type(model).__name__}, random weights"
          + (": generated tokens are ids)" if loaded.processor is None else ")"))
    print(markdown_table(["passes", "visual tokens", "prefill GFLOPs", "prefill ms", "generated"], rows))
    return 0
