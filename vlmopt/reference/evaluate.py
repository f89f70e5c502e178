"""Accuracy of a reference model on a task: greedy ``generate(max_new_tokens=3)`` then :func:`tasks.score`.

    python -m vlmopt.reference.evaluate --model tiny-llava --task shapes --n 500
    python -m vlmopt.reference.evaluate --model tiny-llava --task shapes --n 500 --text-only
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from vlmopt.reference import processing, tasks


@dataclass
class EvalResult:
    """Accuracy of one model on one set of samples."""

    task: str
    split: str
    n: int
    text_only: bool
    accuracy: float
    """Fraction of samples answered right."""
    per_family: dict[str, float]
    """Accuracy per question family."""
    per_answer: dict[str, dict[str, float]]
    """Accuracy per family and right answer: a family at chance because the model always gives one
    answer shows as one answer right and the others at 0."""
    majority: dict[str, float]
    """Majority-answer rate per family (and "overall") of the same samples."""
    seconds: float
    """Wall time of the evaluation."""
    predictions: list[str] = field(default_factory=list, repr=False)
    """Generated text per sample, in order."""
    correct: list[bool] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        """The result without the per-sample lists (what ``eval.json`` stores)."""
        d = asdict(self)
        d.pop("predictions"), d.pop("correct")
        return d


@torch.no_grad()
def answers(model, processor, batch: dict, max_new_tokens: int = 3) -> list[str]:
    """Greedy answers of ``model`` to an encoded ``batch`` (:func:`vlmopt.reference.processing.encode`),
    run on the model's device."""
    device = next(model.parameters()).device
    batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def predict(model, processor, samples: Sequence[tasks.Sample], max_new_tokens: int = 3) -> list[str]:
    """Greedy answers of ``model`` for a batch of samples (all images or all videos)."""
    return answers(model, processor, processing.encode(processor, samples), max_new_tokens)


def evaluate(
    model,
    processor,
    task: tasks.Task,
    split: str = "test",
    n: int = 500,
    batch_size: int = 16,
    text_only: bool = False,
    start: int = 0,
    transform: Callable[[tasks.Sample], tasks.Sample] | None = None,
) -> EvalResult:
    """Accuracy on samples ``start..start+n-1`` of ``split`` (``text_only``: pictures blanked).

    ``transform`` may rewrite each sample first (e.g. to mask objects for an ablation).
    """
    began = time.perf_counter()
    samples = task.samples(split, n=n, start=start)
    model.eval()
    predictions, correct, families, truths = [], [], [], []
    for i in range(0, n, batch_size):
        chunk = list(samples[i : i + batch_size])
        if text_only:
            chunk = [s.text_only() for s in chunk]
        if transform is not None:
            chunk = [transform(s) for s in chunk]
        answers = predict(model, processor, chunk)
        predictions += answers
        correct += [tasks.score(a, s) for a, s in zip(answers, chunk)]
        families += [s.family for s in chunk]
        truths += [s.answer for s in chunk]
    by_answer: dict[str, dict[str, list[bool]]] = {}
    for c, f, t in zip(correct, families, truths):
        by_answer.setdefault(f, {}).setdefault(t, []).append(c)
    per_family, per_answer = {}, {}
    for family in task.families:
        if family in by_answer:
            hits = [c for group in by_answer[family].values() for c in group]
            per_family[family] = sum(hits) / len(hits)
            per_answer[family] = {a: sum(g) / len(g) for a, g in sorted(by_answer[family].items())}
    return EvalResult(
        task=task.name, split=split, n=n, text_only=text_only, accuracy=sum(correct) / max(1, n),
        per_family=per_family, per_answer=per_answer, majority=tasks.majority_rate(tasks.family_answers(task, split, n, start)),
        seconds=time.perf_counter() - began, predictions=predictions, correct=correct,
    )


def main(argv: list[str] | None = None) -> None:
    from vlmopt import reference

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llava", help="reference model name or model directory")
    parser.add_argument("--task", default="shapes", choices=tasks.TASK_NAMES)
    parser.add_argument("--split", default="test", choices=list(tasks.SPLIT_BASES))
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--text-only", action="store_true", help="replace the pictures by uniform grey ones")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = reference.load(args.model)
    task = reference.task_for(args.model, args.task)
    result = evaluate(model, processor, task, args.split, args.n, args.batch_size, args.text_only)
    print(json.dumps(result.summary(), indent=2))


if __name__ == "__main__":
    main()
