"""The command line: ``python -m models.train --model tiny-llava | tiny-qwen25vl | tiny-qwen3vl [--<field> value ...]``
(started again after a stop, the same command resumes the run from its last checkpoint)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import models.train
from models.train.config import PRESETS, NO_FLAG, TrainConfig
from models.train.loop import train


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _words(text: str) -> tuple[str, ...]:
    return tuple(w for w in text.split(",") if w)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path | None]:
    """(config, output directory or None) of a command line: the model's preset with one flag per field."""
    parser = argparse.ArgumentParser(prog="python -m models.train", description=models.train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, default=None, help="model directory (default: models/<model>)")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in NO_FLAG:
            kind = type(getattr(PRESETS["tiny-llava"], f.name))
            parse = {bool: _flag, tuple: _words}.get(kind, kind)
            parser.add_argument("--" + f.name.replace("_", "-"), type=parse, default=None)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in NO_FLAG and getattr(args, f.name) is not None}
    return dataclasses.replace(PRESETS[args.model], **overrides), args.out


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse_args(argv)
    from vlmopt.reference import models_dir

    out = out or models_dir() / cfg.model
    results = train(cfg, out, log=lambda *a: print(*a, flush=True))
    print(json.dumps({k: v for k, v in results.items() if k != "history"}, indent=2)[:4000])
    sys.exit(0)

