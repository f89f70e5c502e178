"""What the subcommands share: loading a model by name, pass specs, inputs, Markdown tables."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmopt.errors import InputError, VlmoptError


@dataclass
class LoadedModel:
    """A model and, for reference or local checkpoints, its processor."""

    name: str
    """What the user asked for."""
    model: Any
    """The Hugging Face model, in eval mode."""
    processor: Any = None
    """Its processor (None for a random-weight config that comes without one)."""

    @property
    def random(self) -> bool:
        """Is it a random-weight config (not a trained checkpoint)?"""
        from vlmopt import configs

        return self.name in configs.CONFIGS


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
    """``--passes`` values as lists of pass specs (``a+b`` is one list of two passes), each spec
    checked now (unknown pass, bad option or value: a clear error before any model is loaded)."""
    from vlmopt import passes

    lists = [[part for part in spec.split("+") if part.strip()] for spec in specs]
    for specs_of_list in lists:
        for spec in specs_of_list:
            passes.parse(spec)
    return lists


def model_directory(name: str) -> Path | None:
    """The directory of model ``name`` after checking it holds a readable ``config.json``; None for a
    random-weight config name. Raises :class:`InputError` naming the problem and the fix."""
    from vlmopt import configs, reference

    if name in configs.CONFIGS:
        return None
    known = f"pass a Hugging Face model directory, one of {', '.join(reference.MODEL_NAMES)}, or a random config ({', '.join(configs.CONFIGS)})"
    try:
        directory = reference.path(name)
    except FileNotFoundError as error:
        raise InputError(f"{error}; or a random config ({', '.join(configs.CONFIGS)})") from None
    if not directory.is_dir():
        raise InputError(f"{directory} is a file, not a model directory; {known}")
    config = directory / "config.json"
    if not config.is_file():
        raise InputError(f"{directory} is not a model directory (no config.json); {known}")
    try:
        content = json.loads(config.read_text())
    except json.JSONDecodeError as error:
        raise InputError(
            f"{config} is not valid JSON (line {error.lineno} column {error.colno}: {error.msg}); re-download or re-save the model"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {config} ({error}); re-download or re-save the model") from None
    if not isinstance(content, dict) or "model_type" not in content:
        raise InputError(f"{config} has no \"model_type\"; it is not a Hugging Face model config, re-download or re-save the model")
    return directory


def load_model(name: str) -> LoadedModel:
    """A random-weight config by name, or a reference model / local checkpoint with its processor."""
    from vlmopt import configs

    directory = model_directory(name)
    if directory is None:
        named = configs.CONFIGS.named(name)
        return LoadedModel(name, configs.build(named.make()), named.processor() if named.processor else None)
    from vlmopt import reference

    try:
        model, processor = reference.load(directory)
    except VlmoptError:
        raise
    except Exception as error:  # noqa: BLE001 - from_pretrained raises OSError, ValueError, safetensors errors...
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise VlmoptError(
            f"cannot load the model {name!r} ({type(error).__name__}: {first_line}); the directory is incomplete or "
            "corrupt: it needs config.json, the weights (model.safetensors) and, for text prompts, the processor "
            "files written by save_pretrained"
        ) from None
    return LoadedModel(name, model, processor)


def check_task(name: str) -> None:
    """Refuse a task name that no reference task has (before any weights load)."""
    from vlmopt import reference

    if name not in reference.TASK_NAMES:
        raise InputError(f"unknown task {name!r}; known tasks: {', '.join(sorted(reference.TASK_NAMES))}")


def reference_task(model: str, task: str):
    """Task ``task`` as reference model ``model`` was trained on it (no weights are loaded); a clear
    error for an unknown task, a random-weight config (no processor, no tasks), or a task the model
    was not trained on."""
    from vlmopt import reference

    check_task(task)
    if model_directory(model) is None:
        from vlmopt import configs

        named = configs.CONFIGS.named(model)
        base = getattr(reference.tasks.TASKS[task], "base", task)  # a task asking new questions about another's pictures
        if named.tasks is None or base not in named.tasks:
            raise InputError(f"{model} is a random-weight config without task {task!r}; pass a reference model "
                             f"({', '.join(reference.MODEL_NAMES)}), a local checkpoint or a random config with tasks "
                             f"({', '.join(n for n in configs.CONFIGS if configs.CONFIGS.named(n).tasks)})")
        return reference.tasks.get(task, **named.tasks[base])
    try:
        return reference.task_for(model, task)
    except KeyError:
        file = reference.path(model) / "tasks.json"
        trained = sorted(json.loads(file.read_text())) if file.exists() else []
        raise InputError(f"{model} was not trained on task {task!r} ({file}); its tasks: {', '.join(trained) or 'none'}") from None


def whole_number_at_least(low: int):
    """An ``argparse`` type: an integer ≥ ``low`` (a clear message otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be ≥ {low}, got {value}")
        return value

    return parse


positive_int = whole_number_at_least(1)
"""``argparse`` type of counts (--n, --repeats): an integer ≥ 1."""


def unit_fraction(text: str) -> float:
    """``argparse`` type of fractions in (0, 1] such as ``--width``; ``1/8`` reads as 0.125."""
    try:
        numerator, _, denominator = text.partition("/")
        value = float(numerator) / float(denominator) if denominator else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number such as 0.125 or 1/8") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
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


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``vlmopt <verb>: error: <problem>`` plus where to
    read the usage (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
