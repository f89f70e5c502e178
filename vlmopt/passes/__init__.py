"""Passes: one per file, registered by the snake_case of their class name.

>>> from vlmopt import passes
>>> passes.get("random_prune")
<class 'vlmopt.passes.random_prune.RandomPrune'>
>>> passes.parse("random_prune:keep_ratio=0.5,seed=0")
RandomPrune(keep_ratio=0.5, num_tokens=None, seed=0)
"""

from __future__ import annotations

import dataclasses
import typing
from fractions import Fraction

from vlmopt.errors import PassConfigError, UnknownPassError
from vlmopt.passes.apbv import APBV
from vlmopt.passes.base import Pass, VisualTokenPrune
from vlmopt.passes.frame_subsample import FrameSubsample
from vlmopt.passes.halfv import HalfV
from vlmopt.passes.hermes import Hermes
from vlmopt.passes.hiprune import HiPrune
from vlmopt.passes.pool_prune import PoolPrune
from vlmopt.passes.random_prune import RandomPrune
from vlmopt.passes.regate import ReGATE, ReGATEState
from vlmopt.passes.snapkv import SnapKV
from vlmopt.passes.streaming_llm import StreamingLLM

#: Every pass, by name. Explicit: a new pass file adds its class here.
REGISTRY: dict[str, type[Pass]] = {
    cls.name(): cls
    for cls in (
        RandomPrune, PoolPrune, HiPrune, HalfV, ReGATE, Hermes, StreamingLLM, SnapKV, FrameSubsample, APBV,
    )
}


def get(name: str) -> type[Pass]:
    """The pass class registered as ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownPassError(f"unknown pass {name!r}; known passes: {', '.join(sorted(REGISTRY))}") from None


def convert(cls: type[Pass], field: str, text: str):
    """``text`` as a value of ``cls``'s config field ``field`` (fractions such as ``1/3`` allowed)."""
    hint = typing.get_type_hints(cls)[field]
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    if text.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    for kind in kinds:
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                return text.lower() in ("true", "1")
            if kind is float:
                return float(Fraction(text)) if "/" in text else float(text)
            if kind is int:
                return int(text)
            if kind is str:
                return text
        except (ValueError, ZeroDivisionError):
            continue
    raise PassConfigError(f"{cls.__name__}.{field}: cannot read {text!r} as {hint}")


def parse(spec: str) -> Pass:
    """Build a pass from ``name:key=value,key=value`` (values may be fractions such as ``1/3``)."""
    name, _, options = spec.strip().partition(":")
    cls = get(name.strip())
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise PassConfigError(
                f"{spec!r}: {item!r} is not key=value with a key of {cls.__name__} ({', '.join(sorted(fields))})"
            )
        kwargs[key] = convert(cls, key, value.strip())
    return cls(**kwargs)


def resolve(item: Pass | str) -> Pass:
    """A pass instance from an instance or a spec string."""
    if isinstance(item, Pass):
        return item
    if isinstance(item, str):
        return parse(item)
    raise PassConfigError(f"passes must be Pass instances or spec strings, got {type(item).__name__}")


__all__ = [
    "APBV", "REGISTRY", "FrameSubsample", "HalfV", "Hermes", "HiPrune", "Pass", "PoolPrune", "RandomPrune", "ReGATE",
    "ReGATEState", "SnapKV", "StreamingLLM", "VisualTokenPrune",
    "convert", "get", "parse", "resolve",
]
