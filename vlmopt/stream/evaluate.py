"""Streams in ``vlmopt eval``: each video appended chunk by chunk, then its question asked.

With a kv-stage pass in the list, :func:`vlmopt.evaluation.evaluate` answers through
:func:`stream_answers` instead of a one-shot ``generate``; the reported visual tokens are those held
in the cache when the question is asked. ``budget_ratio`` sets each video's cache budget to that
fraction of its own visual tokens (the system prompt on top), as HERMES's "68% fewer tokens" counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def visual_tokens_of(compiled, processor, frames) -> int:
    """Visual tokens the whole video takes in the cache (no eviction)."""
    from vlmopt.reference.processing import _video_config_of, video_grid

    config = _video_config_of(processor)
    t, h, w, _, _ = video_grid(frames.shape[0], frames.shape[1], frames.shape[2], config)
    return t * (h // config["merge_size"]) * (w // config["merge_size"])


def stream_answers(
    compiled, processor, samples: Sequence[Any], budget_ratio: float | None = None, max_new_tokens: int = 3,
    advance: Callable[[int], None] | None = None,
) -> tuple[list[str], list[int], list[float]]:
    """(answers, visual tokens in the cache at each question, time to first token in seconds) of
    every sample run as a stream."""
    answers, visual, ttft = [], [], []
    for sample in samples:
        budget = None
        if budget_ratio is not None:
            prefix = compiled.stream(processor=processor, kv_budget=10**9).cache_length
            budget = prefix + max(1, round(budget_ratio * visual_tokens_of(compiled, processor, sample.frames)))
        stream = compiled.stream(processor=processor, kv_budget=budget)
        stream.append(sample.frames)
        answer = stream.ask(sample.question, max_new_tokens=max_new_tokens)
        answers.append(answer.text)
        visual.append(answer.visual_tokens)
        ttft.append(answer.ttft_ms / 1000)
        if advance is not None:
            advance(1)
    return answers, visual, ttft
