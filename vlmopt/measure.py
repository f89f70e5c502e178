"""Measurements shared by the CLI and the benchmarks: prefill time, visual tokens kept, memory."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from vlmopt.runtime import CompiledVLM


@dataclass
class PrefillTiming:
    """Wall-clock prefill times of one batch."""

    median_s: float
    """Median over the timed repeats, in seconds."""
    repeats: int
    """Timed repeats (after one untimed warm-up)."""


def time_prefill(run, repeats: int = 5, warmup: int = 2) -> PrefillTiming:
    """Time ``run()`` (one prefill) ``repeats`` times after ``warmup`` runs; median seconds."""
    with torch.inference_mode():
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return PrefillTiming(statistics.median(times), repeats)


def prefill_runner(compiled: CompiledVLM, batch: dict[str, Any], logits_to_keep: int = 1):
    """A zero-argument prefill of ``batch`` (planning included, as a user pays for it)."""

    def run():
        prompt = compiled.plan(batch, for_generation=True)
        return compiled.run_stage(prompt.stage, prompt.inputs, compiled.new_cache(), logits_to_keep)

    return run


def hf_prefill_runner(model, batch: dict[str, Any], logits_to_keep: int = 1):
    """The same prefill through the HF model's own forward."""

    def run():
        return model(**batch, logits_to_keep=logits_to_keep, use_cache=True)

    return run


def visual_tokens(compiled: CompiledVLM, batch: dict[str, Any]) -> tuple[int, int]:
    """(visual tokens in the prompt, visual tokens that reach the LLM) for ``batch``."""
    prompt = compiled.plan(batch, for_generation=True)
    if prompt.layout is None:
        return 0, 0
    with torch.inference_mode():
        out = compiled.run_stage(prompt.stage, prompt.inputs, None, 1)
    kept_len = out["attention_mask"].sum(-1)
    full_len = prompt.inputs["attention_mask"].sum(-1)
    dropped = int((full_len - kept_len).sum())
    return prompt.layout.total, prompt.layout.total - dropped
