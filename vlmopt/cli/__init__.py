"""The ``vlmopt`` command line: one module per subcommand, each adding its own parser."""

from __future__ import annotations

import argparse
import sys

from vlmopt.cli import analyze_cmd, bench, demo, eval_cmd, export_cmd, inspect_cmd, run_cmd, viz_cmd

SUBCOMMANDS = (demo, inspect_cmd, eval_cmd, bench, viz_cmd, export_cmd, run_cmd, analyze_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmopt", description="Compiler passes that make VLMs cheaper to run.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vlmopt.errors import VlmoptError

    args = build_parser().parse_args(argv)
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
