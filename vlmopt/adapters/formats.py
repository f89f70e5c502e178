"""How the reference tasks talk to a family vlmopt's built-in reference formats do not cover: a
:class:`PromptFormat` per family, declared in the family's adapter file (``Adapter.prompt_format``).

:mod:`vlmopt.reference.processing` builds the word-level tokenizer, the HF processor, the prompts and
the video inputs of any ``arch`` key through the format registered under it, so a random-weight
config of the family has a processor whose special ids are the config's (``NamedConfig.processor``),
and every CLI verb that prompts a model (``eval``, ``viz``, ``demo``, ``export``, ``finetune``) takes it.
"""

from __future__ import annotations

import unittest.mock
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromptFormat:
    """One family's reference prompt format and offline processor."""

    arch: str
    """The key :mod:`vlmopt.reference.processing` functions take (``build_processor(arch, ...)``)."""
    processor_class: str
    """The HF processor class it builds (how ``arch_of`` recognises a processor)."""
    special: tuple[str, ...]
    """Special tokens, in id order from 0 (the family's random configs use these ids)."""
    tokens: Mapping[str, str]
    """Tokenizer roles → special token: ``eos_token``, ``pad_token`` (and ``bos_token``), then the
    processor's own attributes (``image_token``, ``start_image_token``, …)."""
    prompt: Callable[[str, bool], str]
    """(question, is_video) → the user turn and the generation prompt, visual placeholder unexpanded."""
    answer: Callable[[str], str]
    """answer → what the model is trained to generate (the answer, then the end token)."""
    follow_up: Callable[[str], str]
    """question → a later turn without a picture, after the previous answer."""
    assemble: Callable[..., Any]
    """(tokenizer, image processor or None, image_size, video_size, **settings) → the HF processor (None:
    built); ``settings`` are a model's own (its tile grids, …: ``build_processor``'s keywords, saved with it)."""
    image_processor: Callable[[int], Any]
    """image_size → the image processor (PIL backend: no torchvision)."""
    videos: Callable[[Any, list[str], list[Any]], dict[str, Any]] | None = None
    """(processor, prompts, clips uint8 [T, H, W, 3]) → the model inputs of a batch of videos, written as
    the family's processor writes them (None: the family takes no video)."""
    words: tuple[str, ...] = ()
    """Words its prompts use beyond the tasks' vocabulary (``frame``, ``image``, …)."""
    split_digits: bool = False
    """Split numbers into digits (prompts with frame numbers or row/column tokens)."""
    bos: str | None = None
    """Token the tokenizer puts in front of every text (None: none)."""
    padding_side: str = "left"
    """Side the tokenizer pads a batch on (left: prompts end together, for ``generate``)."""
    names: tuple[str, ...] = ()
    """What a model name or path of the family contains besides its arch key (``-`` read as ``_``), checked
    before any other format's (a name such as ``llava-onevision-qwen2-7b`` also says ``qwen``)."""
    stacked_videos: bool = False
    """The processor stacks a batch's clips into one tensor: a batch's clips need one length."""


def lenient_construction(cls, **parts):
    """``cls(**parts)`` with a missing video processor allowed (the HF video processors need torchvision,
    which is not installed: their slot stays None; images and text work)."""
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, arg):
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    with unittest.mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lenient):
        return cls(**parts)


def formats() -> dict[str, PromptFormat]:
    """Every registered family's prompt format, by arch key."""
    from vlmopt.adapters import families

    return {cls.prompt_format.arch: cls.prompt_format for cls in families() if cls.prompt_format is not None}


def get(arch: str) -> PromptFormat | None:
    """The format registered under ``arch`` (None: none)."""
    return formats().get(arch)


def of_processor(processor) -> PromptFormat | None:
    """The format whose HF processor class ``processor`` is (None: none)."""
    name = type(processor).__name__
    return next((f for f in formats().values() if f.processor_class == name), None)
