"""Shared helpers of the stream tests: a processor for the random-weight tiny Qwen2.5-VL, random
frames, and the one-shot prompt of the same frames and question."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from vlmopt.reference.processing import build_processor, encode


def qwen_processor():
    """The reference Qwen processor (its video / image token ids match the tiny test config's)."""
    return build_processor("qwen2_5_vl", 56, video_size=56)


def random_frames(count: int, seed: int, size: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def one_shot(processor, frames: np.ndarray, question: str) -> dict:
    """Processor outputs of the one-shot prompt: the whole video, then the question."""
    sample = SimpleNamespace(question=question, is_video=True, frames=frames)
    return encode(processor, [sample])
