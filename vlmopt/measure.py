"""Measurements shared by the CLI and the benchmarks: prefill time, visual tokens kept, memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, overload

import torch

from vlmopt.runtime import CompiledVLM


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of the timed runs of one callable."""

    samples_s: tuple[float, ...]
    """Seconds of every timed run, in the order they ran."""
    warmup: int
    """Untimed runs before them."""

    @property
    def median_s(self) -> float:
        """Median seconds (what vlmopt reports)."""
        return statistics.median(self.samples_s)

    @property
    def min_s(self) -> float:
        """Fastest run, in seconds."""
        return min(self.samples_s)

    @property
    def repeats(self) -> int:
        """Number of timed runs."""
        return len(self.samples_s)

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: how noisy the runs were."""
        return (max(self.samples_s) - min(self.samples_s)) / self.median_s if self.median_s else 0.0


def synchronize() -> None:
    """Wait for the work queued on CUDA, if this process uses CUDA (a GPU runs asynchronously: without
    it a clock stops when the kernels are launched, not when they finish). Never initialises CUDA."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


@overload
def measure(run: Callable[[], Any], repeats: int = ..., warmup: int = ...) -> Timing: ...
@overload
def measure(run: Mapping[str, Callable[[], Any]], repeats: int = ..., warmup: int = ...) -> dict[str, Timing]: ...
def measure(run, repeats: int = 5, warmup: int = 2):
    """Time ``run()`` ``repeats`` times after ``warmup`` untimed runs, under ``torch.inference_mode``
    (on a GPU, from an idle device to the end of the run's kernels).

    ``run`` may be a mapping of names to callables: they are then timed side by side, alternating
    in ABBA order (repeat r runs them forwards when r is even, backwards when odd) so that none of
    them always runs first (caches, CPU frequency drift), and a Timing per name comes back.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"measure: repeats={repeats} must be ≥ 1 and warmup={warmup} ≥ 0")
    runs = dict(run) if isinstance(run, Mapping) else {"": run}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(warmup):
            for call in runs.values():
                call()
        for repeat in range(repeats):
            for name in list(runs)[:: 1 if repeat % 2 == 0 else -1]:
                synchronize()
                start = time.perf_counter()
                runs[name]()
                synchronize()
                samples[name].append(time.perf_counter() - start)
    timings = {name: Timing(tuple(times), warmup) for name, times in samples.items()}
    return timings if isinstance(run, Mapping) else timings[""]


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


# ----- memory -----------------------------------------------------------------------------------
class _HeapProbe:
    """Bytes the C heap holds now (glibc ``mallinfo2``: arena + mmap'd blocks), or None elsewhere."""

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
            )]

        self._info = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            libc.mallinfo2.restype = MallInfo2
            self._info = libc.mallinfo2
        except (OSError, AttributeError, TypeError):
            self._info = None

    @property
    def available(self) -> bool:
        return self._info is not None

    def __call__(self) -> int:
        info = self._info()
        return int(info.uordblks + info.hblkhd)


def peak_prefill_bytes(run) -> int | None:
    """Peak extra heap bytes while ``run()`` executes (sampled after every ATen op), or None if the
    C library cannot say (not glibc)."""
    import gc

    from torch.utils._python_dispatch import TorchDispatchMode

    probe = _HeapProbe()
    if not probe.available:
        return None

    class Sampler(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Sampler.peak = max(Sampler.peak, probe())
            return out

    gc.collect()
    with torch.inference_mode():
        run()  # warm-up: allocator caches and lazily built buffers are not the prefill's cost
        gc.collect()
        base = probe()
        Sampler.peak = base
        with Sampler():
            run()
    return Sampler.peak - base


def cache_bytes(cache) -> int:
    """Bytes held by a filled ``DynamicCache`` (keys and values of every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def time_by_role(compiled: CompiledVLM, batch: dict[str, Any], repeats: int = 3) -> dict[str, float]:
    """Median seconds spent in the prefill graph's nodes, summed by node role (node-by-node run)."""
    # One untimed run first: the first call pays for lazy initialisation in every module.
    from contextlib import contextmanager

    from vlmopt.graph.probe import run_with_probes

    prompt = compiled.plan(batch, for_generation=True)
    module = compiled.stages[prompt.stage]
    samples: list[dict[str, float]] = []
    for _ in range(repeats + 1):
        spent: dict[str, float] = {}

        @contextmanager
        def clock(node):
            start = time.perf_counter()
            yield
            role = node.meta.get("role", "?")
            spent[role] = spent.get(role, 0.0) + time.perf_counter() - start

        inputs = dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=1)
        with torch.inference_mode():
            run_with_probes(module, inputs, lambda node: False, around=clock)
        samples.append(spent)
    samples = samples[1:]
    return {role: statistics.median(s.get(role, 0.0) for s in samples) for role in samples[0]}
