"""What the subcommands share: loading a model by name, pass specs, inputs, Markdown tables."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from vlmopt.errors import VlmoptError


@dataclass
class LoadedModel:
    """A model and, for reference or local checkpoints, its processor."""

    name: str
    """What the user asked for."""
    model: Any
    """The Hugging Face model, in eval mode."""
    processor: Any = None
    """Its processor (None for random-weight configs)."""


def add_model_argument(parser: argparse.ArgumentParser, default: str | None = None, required: bool | None = None) -> None:
    from vlmopt.configs import CONFIGS

    parser.add_argument(
        "--model",
        default=default,
        required=default is None if required is None else required,
        help=f"reference model name, local checkpoint path, or random config ({', '.join(CONFIGS)})",
    )


def add_passes_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--passes",
        action="append",
        default=[],
        metavar="SPEC",
        help="pass list, e.g. 'random_prune:keep_ratio=0.5' (several passes: join with '+'; repeat the flag "
        "to compare several lists)",
    )


def pass_lists(specs: list[str]) -> list[list[str]]:
    """``--passes`` values as lists of pass specs (``a+b`` is one list of two passes)."""
    return [[part for part in spec.split("+") if part.strip()] for spec in specs]


def load_model(name: str) -> LoadedModel:
    """A random-weight config by name, or a reference model / local checkpoint with its processor."""
    from vlmopt import configs

    if name in configs.CONFIGS:
        return LoadedModel(name, configs.build(configs.CONFIGS[name]()))
    try:
        from vlmopt import models
    except ImportError as error:  # pragma: no cover - the package ships vlmopt.models
        raise VlmoptError(f"cannot load {name!r}: {error}") from error
    model, processor = models.load(name)
    return LoadedModel(name, model, processor)


def positive_int(text: str) -> int:
    """``argparse`` type of counts (--n, --repeats): an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fail(message: str) -> int:
    print(f"vlmopt: error: {message}", file=sys.stderr)
    return 2
