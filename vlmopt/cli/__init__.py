"""The ``vlmopt`` command line: one module per subcommand, each adding its own parser."""

from __future__ import annotations

import sys

from vlmopt.cli import analyze_cmd, bench, demo, eval_cmd, export_cmd, finetune, inspect_cmd, regate_cmd, run_cmd, tasks_cmd, viz_cmd

SUBCOMMANDS = (demo, inspect_cmd, eval_cmd, bench, viz_cmd, export_cmd, run_cmd, analyze_cmd, tasks_cmd, regate_cmd, finetune)


def build_parser():
    from vlmopt.cli.common import Parser

    parser = Parser(prog="vlmopt", description="Compiler passes that make VLMs cheaper to run.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); the exit status: 0 done, 2 bad
    input (one line on stderr: ``vlmopt <verb>: error: <problem and fix>``), others per verb."""
    from vlmopt.errors import VlmoptError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # usage errors (status 2) and --help (0): a status, also in-process
        return exit.code if isinstance(exit.code, int) else 2
    try:
        return args.run(args)
    except (VlmoptError, FileNotFoundError) as error:
        print(f"vlmopt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
