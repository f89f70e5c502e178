"""Streams in ``vlmopt eval``: each video appended chunk by chunk, then its question asked.

With a kv-stage pass in the list, :func:`vlmopt.evaluation.evaluate` answers through
:func:`stream_answers` instead of a one-shot ``generate``; the reported visual tokens are those held
in the cache when the question is asked. ``budget_ratio`` sets each video's cache budget to that
fraction of its own visual tokens (the system prompt on top), as HERMES's "68% fewer tokens" counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def stream_answers(
    compiled, processor, samples: Sequence[Any], budget_ratio: float | None = None, max_new_tokens: int = 3,
    advance: Callable[[int], None] | None = None,
) -> tuple[list[str], list[int], list[float]]:
    """(answers, visual tokens in the cache at each question, time to first token in seconds) of
    every sample run as a stream."""
    answers, visual, ttft = [], [], []
    for sample in samples:
        budget = None
        if budget_ratio is not None:  # the whole video's cache entries, as the family's planner counts them
            probe = compiled.stream(processor=processor, kv_budget=10**9)
            budget = probe.cache_length + max(1, round(budget_ratio * probe.planner.visual_tokens(sample.frames)))
        stream = compiled.stream(processor=processor, kv_budget=budget)
        stream.append(sample.frames)
        answer = stream.ask(sample.question, max_new_tokens=max_new_tokens)
        answers.append(answer.text)
        visual.append(answer.visual_tokens)
        ttft.append(answer.ttft_ms / 1000)
        if advance is not None:
            advance(1)
    return answers, visual, ttft
