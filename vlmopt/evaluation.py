"""The evaluation harness behind ``vlmopt eval``: accuracy against cost, pass list by pass list.

Every pass list runs on the same samples as the unpruned model (the baseline). Metrics:

* ``accuracy``: share of right answers (greedy, 3 new tokens, scored by the task);
* ``retention``: accuracy as a fraction of the baseline's, with ``retention_ci``, its 95% paired
  bootstrap interval (the samples resampled together for both runs), and the paired counts ``lost``
  (right without the passes, wrong with them) and ``gained`` (the reverse);
* ``loyalty``: share of samples answered exactly as the baseline answered them;
* ``visual_tokens``: visual tokens reaching the LLM per sample (mean);
* ``prefill_flops`` / ``llm_prefill_flops``: FLOPs of one prefill (the first sample), counted on
  fake tensors;
* ``prefill_seconds``: median wall time of a batch-1 prefill over the first samples (each timed
  once, after one warm-up).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import vlmopt
from vlmopt import passes as passes_module
from vlmopt.errors import PassConfigError
from vlmopt.measure import measure, prefill_runner


@dataclass
class RunResult:
    """Metrics of one pass list on the evaluated samples."""

    passes: str
    """The pass list, as specs joined by ' + ' (empty for the baseline)."""
    accuracy: float
    """Share of samples answered right."""
    retention: float
    """Accuracy over the baseline's accuracy."""
    loyalty: float
    """Share of samples answered exactly as the baseline answered them."""
    visual_tokens: float
    """Visual tokens reaching the LLM per sample."""
    prefill_flops: int
    """FLOPs of one prefill (first sample)."""
    llm_prefill_flops: int
    """The LLM's share of those FLOPs."""
    prefill_seconds: float
    """Median batch-1 prefill time."""
    retention_ci: tuple[float, float] = (1.0, 1.0)
    """95% paired bootstrap interval of ``retention`` (see :func:`retention_interval`)."""
    lost: int = 0
    """Samples the baseline answered right and this run wrong."""
    gained: int = 0
    """Samples the baseline answered wrong and this run right."""
    per_family: dict[str, float] = field(default_factory=dict)
    """Accuracy per question family."""
    answers: list[str] = field(default_factory=list, repr=False)
    """Per sample: the decoded answer (not in :meth:`summary`)."""
    correct: list[bool] = field(default_factory=list, repr=False)
    """Per sample: whether it was answered right (not in :meth:`summary`)."""

    def summary(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("answers")
        out.pop("correct")
        return out


def retention_interval(
    baseline_correct: Sequence[bool], run_correct: Sequence[bool], level: float = 0.95, resamples: int = 2000, seed: int = 0,
) -> tuple[float, float]:
    """Paired bootstrap interval of retention = sum(run_correct) / sum(baseline_correct).

    Both lists hold one entry per sample (same samples, same order). Each of ``resamples`` draws
    picks n samples with replacement and takes the ratio on them for both runs together, so the
    interval reflects how often the two runs disagree, not the spread of either accuracy alone.
    A draw where the baseline has no right answer counts as retention 1. Seeded: reproducible.
    """
    base = np.asarray(baseline_correct, dtype=np.int64)
    run = np.asarray(run_correct, dtype=np.int64)
    if base.shape != run.shape or base.ndim != 1 or base.size == 0:
        raise ValueError(f"retention_interval needs two equal, non-empty 1-D lists; got {base.shape} and {run.shape}")
    if not 0 < level < 1:
        raise ValueError(f"retention_interval: level={level} must be in (0, 1)")
    draws = np.random.default_rng(seed).integers(0, base.size, size=(resamples, base.size))
    base_right, run_right = base[draws].sum(axis=1), run[draws].sum(axis=1)
    ratios = np.where(base_right > 0, run_right / np.maximum(base_right, 1), 1.0)
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def sweep_lists(lists: list[list[str]], sweeps: str | Sequence[str] | None) -> list[list[str]]:
    """Expand each ``key=v1,v2,...`` of ``sweeps`` over the pass lists: in every list, the passes with
    field ``key`` take each value in turn (one run per value); lists with no such pass run once.
    A sweep whose key no pass has is an error."""
    for sweep in [sweeps] if isinstance(sweeps, str) else sweeps or ():
        key, _, values = sweep.partition("=")
        if not values:
            raise PassConfigError(f"--sweep takes key=value,value,...; got {sweep!r}")
        expanded, matched = [], False
        for specs in lists:
            items = [passes_module.parse(spec) for spec in specs]
            has_key = [key in {f.name for f in dataclasses.fields(item)} for item in items]
            if not any(has_key):
                expanded.append(specs)
                continue
            matched = True
            for value in values.split(","):
                expanded.append([
                    dataclasses.replace(item, **{key: passes_module.convert(type(item), key, value.strip())}).spec()
                    if swept else item.spec()
                    for item, swept in zip(items, has_key)
                ])
        if not matched:
            raise PassConfigError(f"--sweep {key}: none of {[spec for specs in lists for spec in specs]} has a field {key!r}")
        lists = expanded
    return lists


class Progress:
    """A one-line progress bar on stderr (a line per quarter when stderr is not a terminal)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.tty = label, total, 0, sys.stderr.isatty()
        self.began, self.reported = time.perf_counter(), -1

    def advance(self, count: int) -> None:
        self.done += count
        elapsed = time.perf_counter() - self.began
        if self.tty:
            width = 30
            filled = int(width * self.done / max(1, self.total))
            sys.stderr.write(f"\r{self.label:<40} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.0f}s")
            if self.done >= self.total:
                sys.stderr.write("\n")
        elif self.done * 4 // max(1, self.total) > self.reported:
            self.reported = self.done * 4 // max(1, self.total)
            sys.stderr.write(f"{self.label}: {self.done}/{self.total} ({elapsed:.0f}s)\n")
        sys.stderr.flush()


def evaluate(
    model,
    processor,
    samples: Sequence[Any],
    pass_lists: list[list[str]],
    batch_size: int = 16,
    timing_samples: int = 8,
    progress: bool = True,
    stream_budget: float | None = None,
) -> dict[str, Any]:
    """Evaluate the model without passes and with each pass list; ``{"baseline": ..., "runs": [...]}``.

    A list with a kv-stage pass (HERMES, the eviction baselines) runs every video as a stream
    (:func:`vlmopt.stream.evaluate.stream_answers`, each video's budget ``stream_budget`` of its
    visual tokens when given); its ``visual_tokens`` are those in the cache at the question and its
    ``prefill_seconds`` the median time to the first answer token.
    """
    from vlmopt.reference import processing, tasks

    device = next(model.parameters()).device  # the processor encodes on the CPU

    def encode(chunk: list) -> dict[str, Any]:
        batch = processing.encode(processor, chunk)
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}

    batches = [encode(run) for run in processing.batches(processor, samples, batch_size)]
    singles = [encode([samples[i]]) for i in range(min(timing_samples, len(samples)))]
    results: list[RunResult] = []
    for specs in [[]] + pass_lists:
        compiled = vlmopt.compile(model, passes=specs)
        label = " + ".join(specs) or "(no passes)"
        bar = Progress(label, len(samples)) if progress else None
        answers, kept = [], 0.0
        streamed = any(item.stage == "kv" for item in compiled.passes)
        if streamed:
            from vlmopt.stream.evaluate import stream_answers

            answers, visual, ttft = stream_answers(
                compiled, processor, samples, stream_budget, advance=bar.advance if bar else None
            )
            kept = float(sum(visual))
        for batch in [] if streamed else batches:
            with torch.inference_mode():
                ids = compiled.generate(**batch, max_new_tokens=3, do_sample=False)
            answers += processor.tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            kept += compiled.visual_tokens_kept(compiled.plan(batch, for_generation=True))
            if bar:
                bar.advance(batch["input_ids"].shape[0])
        flops = vlmopt.flops(compiled, singles[0])
        runners = [prefill_runner(compiled, single) for single in singles]
        turns = itertools.cycle(runners)  # one warm-up on the first sample, then each sample once
        timing = measure(lambda: next(turns)(), repeats=len(runners), warmup=1)
        seconds = float(np.median(ttft)) if streamed else timing.median_s
        correct = [tasks.score(a, s) for a, s in zip(answers, samples)]
        per_family: dict[str, list[bool]] = {}
        for c, s in zip(correct, samples):
            per_family.setdefault(s.family, []).append(c)
        baseline = results[0] if results else None
        accuracy = sum(correct) / len(samples)
        reference = baseline.correct if baseline else correct
        results.append(RunResult(
            passes=" + ".join(specs),
            accuracy=accuracy,
            retention=accuracy / baseline.accuracy if baseline and baseline.accuracy else 1.0,
            retention_ci=retention_interval(reference, correct),
            lost=sum(b and not c for b, c in zip(reference, correct)),
            gained=sum(c and not b for b, c in zip(reference, correct)),
            loyalty=(sum(tasks.normalize(a) == tasks.normalize(b) for a, b in zip(answers, baseline.answers)) / len(samples))
            if baseline else 1.0,
            visual_tokens=kept / len(samples),
            prefill_flops=flops.total,
            llm_prefill_flops=flops.llm,
            prefill_seconds=seconds,
            per_family={f: sum(v) / len(v) for f, v in sorted(per_family.items())},
            answers=answers,
            correct=correct,
        ))
    return {"baseline": results[0], "runs": results[1:]}


def plot(report: dict[str, Any], path: str, title: str) -> None:
    """Accuracy against prefill FLOPs; one line per pass (its sweep), the baseline as a star."""
    from vlmopt.plots import pyplot

    plt = pyplot()
    lines: dict[str, list[RunResult]] = {}
    for run in report["runs"]:
        name = " + ".join(spec.split(":")[0] for spec in run.passes.split(" + "))
        lines.setdefault(name, []).append(run)
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    base = report["baseline"]
    for name, runs in lines.items():
        runs = sorted(runs, key=lambda r: r.prefill_flops)
        axis.plot([r.prefill_flops / 1e9 for r in runs], [100 * r.accuracy for r in runs], marker="o", label=name)
    axis.plot([base.prefill_flops / 1e9], [100 * base.accuracy], marker="*", markersize=14, color="black",
              linestyle="none", label="no pruning")
    axis.set_xlabel("prefill GFLOPs (one prompt)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
