"""``vlmopt viz``: draw the kept visual tokens of a pass list, coloured by kind, to a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmopt.cli.common import add_model_argument, add_passes_argument, load_model, pass_lists


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("viz", help="draw which visual tokens a pass keeps (anchor/buffer/register)")
    add_model_argument(parser)
    add_passes_argument(parser)
    parser.add_argument("--image", help="image file (default: a test sample of the model's task)")
    parser.add_argument("--prompt", default="What is in the picture?", help="question asked with the image")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import vlmopt
    from vlmopt import configs
    from vlmopt.errors import InputError
    from vlmopt.viz import visualise

    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise InputError(f"--out {out}: " + ("is a directory" if out.is_dir() else f"the directory {out.parent} does not exist")
                         + "; pass the path of a PNG file in an existing directory")
    passes = (pass_lists(args.passes) or [[]])[0]
    if args.image:
        from vlmopt.export.inputs import load_image

        image = load_image(args.image)  # a missing or unreadable file fails before the model loads
    loaded = load_model(args.model)
    compiled = vlmopt.compile(loaded.model, passes=passes)
    if loaded.processor is None:
        if args.image:
            raise InputError(f"{args.model} is a random-weight config without a processor; pass a model with one")
        batch = configs.synthetic_batch(loaded.model)
    else:
        from vlmopt.reference import processing

        if not args.image:
            from vlmopt.cli.common import reference_task

            image = reference_task(args.model, "shapes").samples("test", n=1)[0].pil_image()
        text = processing.prompt(processing.arch_of(loaded.processor), args.prompt)
        batch = dict(loaded.processor(text=[text], images=[image], return_tensors="pt"))
    picture = visualise(compiled, batch, loaded.processor)
    picture.save(args.out)
    print(f"wrote {args.out} ({' + '.join(passes) or 'no passes'})")
    return 0
