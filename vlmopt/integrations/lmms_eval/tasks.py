"""vlmopt's reference tasks as offline lmms-eval tasks (``vlmopt tasks export``).

``export(task="shapes", n=200, out="tasks/")`` writes, under ``out``:

* ``vlmopt_shapes_data/``: the samples as a ``datasets.DatasetDict`` (``save_to_disk``, one ``test``
  split; columns ``task``, ``index``, ``family``, ``question``, ``answer`` and ``image``, or ``frames`` for a
  video task), images stored as PNG, so pixels are exactly the ones ``vlmopt eval`` renders;
* ``vlmopt_shapes.yaml``: the task (``--include_path out --tasks vlmopt_shapes``): greedy, 3 new
  tokens, the question as the prompt text, like ``vlmopt eval``;
* ``vlmopt_shapes_choice.yaml``: the same samples as a ``multiple_choice`` task (the family's answers
  ranked by the model's loglikelihood);
* ``utils.py``: ``doc_to_visual`` / ``doc_to_text`` and the scorer, which is vlmopt's own
  (:func:`vlmopt.reference.tasks.score`: the first word of the answer, normalised); metrics
  ``accuracy`` and ``accuracy_<family>``.

The samples are those of ``vlmopt.reference.task_for(model, task)`` (the task as ``model`` was trained
on it): the recorded test split (indices ``0..n-1``), or ``n`` indices drawn from ``seed``, like
``vlmopt eval --n N [--seed S]``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmopt.errors import InputError, MissingDependencyError

UTILS = '''"""Written by `vlmopt tasks export`: prompt, visuals and scorer of vlmopt's reference tasks."""

import numpy as np

from vlmopt.reference import tasks


def doc_to_visual(doc):
    """A one-image list (PIL), or for a video a one-item list holding its frames, uint8 [T, H, W, 3]."""
    if doc.get("frames"):
        return [np.stack([np.asarray(frame.convert("RGB")) for frame in doc["frames"]])]
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question: the model's chat template adds the rest, as `vlmopt eval` prompts it."""
    return doc["question"]


def process_results(doc, results):
    """1.0 if the first word of the answer is right (vlmopt.reference.tasks.score), else 0.0; per family too."""
    right = float(tasks.score(results[0], doc["answer"]))
    out = {"accuracy": right}
    for family in FAMILIES[doc["task"]]:
        out["accuracy_" + family] = right if doc["family"] == family else None
    return out


def doc_to_choice(doc):
    """The answers of the question's family (the `_choice` task scores them by likelihood)."""
    return list(ANSWERS[doc["task"]][doc["family"]])


def mean_of_scored(values):
    """Mean over the samples a per-family metric applies to (the others report None)."""
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else float("nan")


ANSWERS = {answers}
"""Each task's question families and their possible answers."""
FAMILIES = {task: list(families) for task, families in ANSWERS.items()}
'''


def task_name(task: str) -> str:
    """lmms-eval's name of reference task ``task``: ``vlmopt_shapes``, ``vlmopt_shapes_video``, ``vlmopt_needle``."""
    return "vlmopt_" + task.replace("-", "_")


def _yaml(name: str, data_dir: Path, families: list[str], metadata: dict) -> str:
    lines = [
        f"# Written by `vlmopt tasks export`: {metadata['task']} for {metadata['model']}, n={metadata['n']}.",
        f"task: {name}",
        f"dataset_path: {json.dumps(str(data_dir))}",
        "dataset_kwargs:",
        "  load_from_disk: true",
        "test_split: test",
        "output_type: generate_until",
        "doc_to_visual: !function utils.doc_to_visual",
        "doc_to_text: !function utils.doc_to_text",
        "doc_to_target: answer",
        "generation_kwargs:",
        "  max_new_tokens: 3",
        "  temperature: 0",
        "  do_sample: false",
        "  until: []",
        "process_results: !function utils.process_results",
        "metric_list:",
        "  - metric: accuracy",
        "    aggregation: mean",
        "    higher_is_better: true",
    ]
    for family in families:
        lines += [f"  - metric: accuracy_{family}", "    aggregation: !function utils.mean_of_scored", "    higher_is_better: true"]
    lines += ["metadata:", "  version: 1.0"] + [f"  {key}: {json.dumps(value)}" for key, value in metadata.items()]
    return "\n".join(lines) + "\n"


def _choice_yaml(name: str, data_dir: Path, metadata: dict) -> str:
    """The same samples as a likelihood task: the family's answers ranked by the model's loglikelihood."""
    lines = [
        f"# Written by `vlmopt tasks export`: {metadata['task']} for {metadata['model']}, n={metadata['n']}, "
        "answers ranked by likelihood.",
        f"task: {name}_choice",
        f"dataset_path: {json.dumps(str(data_dir))}",
        "dataset_kwargs:",
        "  load_from_disk: true",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_visual: !function utils.doc_to_visual",
        "doc_to_text: !function utils.doc_to_text",
        "doc_to_choice: !function utils.doc_to_choice",
        "doc_to_target: answer",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
    ]
    return "\n".join(lines) + "\n"


def export(task: str, n: int, out: str | Path, model: str = "tiny-llava", seed: int | None = None, name: str | None = None) -> Path:
    """Write reference task ``task`` (``n`` test samples, configured as ``model`` was trained on it)
    as an lmms-eval task under ``out``; returns the YAML's path."""
    from vlmopt import reference

    if n < 1:
        raise InputError(f"--n must be ≥ 1, got {n}")
    if task not in reference.TASK_NAMES:
        raise InputError(f"unknown task {task!r}; known tasks: {', '.join(reference.TASK_NAMES)}")
    try:
        task_obj = reference.task_for(model, task)
    except KeyError as error:
        raise InputError(f"{error.args[0]}; pick --model (tiny-llava: shapes; tiny-qwen25vl: all tasks)") from None
    if task_obj.sentences:
        raise InputError(f"{task!r} has sentence answers (scored by vlmopt's own score_answer, not a first-word match); "
                         "the lmms-eval export covers the one-word tasks: score it with vlmopt eval")
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError('vlmopt tasks export needs the datasets package: pip install "vlmopt[lmms]"') from None
    samples = task_obj.samples("test", n=n, seed=seed)
    name = name or task_name(task)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    columns = {"task": datasets.Value("string"), "index": datasets.Value("int64"), "family": datasets.Value("string"),
               "question": datasets.Value("string"), "answer": datasets.Value("string")}
    if task_obj.video:
        columns["frames"] = datasets.Sequence(datasets.Image())
    else:
        columns["image"] = datasets.Image()

    chunks = []
    for start in range(0, n, 32):  # PNG-encoded 32 samples at a time: a long video task stays small in memory
        part = [samples[i] for i in range(start, min(n, start + 32))]
        rows = {"task": [task] * len(part), "index": [s.index for s in part], "family": [s.family for s in part],
                "question": [s.question for s in part], "answer": [s.answer for s in part]}
        if task_obj.video:
            rows["frames"] = [s.pil_frames() for s in part]
        else:
            rows["image"] = [s.pil_image() for s in part]
        chunks.append(datasets.Dataset.from_dict(rows, features=datasets.Features(columns)))
    test = datasets.concatenate_datasets(chunks)
    data_dir = out / f"{name}_data"
    datasets.DatasetDict({"test": test}).save_to_disk(str(data_dir))
    families = list(task_obj.families)
    metadata = {"task": task, "model": str(model), "n": n, "seed": seed, "config": repr(task_obj.config)}
    yaml_path = out / f"{name}.yaml"
    yaml_path.write_text(_yaml(name, data_dir, families, metadata))
    utils = out / "utils.py"
    answers = {cls.name: {family: list(values) for family, values in cls.families.items()} for cls in _task_classes()}
    utils.write_text(UTILS.replace("{answers}", repr(answers)))
    (out / f"{name}_choice.yaml").write_text(_choice_yaml(name, data_dir, metadata))
    return yaml_path


def _task_classes():
    from vlmopt.reference import tasks

    return tasks.TASKS.values()
