"""Reference VLMs trained on synthetic tasks, shipped in the repository's ``models/`` directory: how to
load them, their tasks and inputs, and the evaluation harness that scores them.

>>> from vlmopt import reference
>>> model, processor = reference.load("tiny-llava")          # LlavaForConditionalGeneration, eval mode
>>> task = reference.task_for("tiny-llava", "shapes")         # the task as the model was trained on it
>>> s = task.samples("test", n=500)[0]
>>> inputs = reference.processing.encode(processor, [s])
>>> answer = processor.batch_decode(model.generate(**inputs, max_new_tokens=3)[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
>>> reference.tasks.score(answer, s)

Models: ``tiny-llava`` (images) and ``tiny-qwen25vl`` (images and videos). Tasks: ``shapes``,
``shapes-video``, ``needle`` (see :mod:`vlmopt.reference.tasks`). Submodules load lazily; importing this
package imports nothing beyond the standard library (torch/transformers come with :func:`load`).

The code that trained the models (``python -m models.train``) and the research benchmarks about them
(``models.bench``) are in the repository's top-level ``models`` package, which runs from a checkout
and is not installed with vlmopt.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

MODEL_NAMES = ("tiny-llava", "tiny-qwen25vl", "tiny-qwen3vl")
"""Reference models shipped in ``models/``."""
TASK_NAMES = ("shapes", "shapes-video", "needle", "shapes-relations", "shapes-captions")
"""Synthetic tasks (:mod:`vlmopt.reference.tasks`); ``shapes-relations`` asks new questions about the
``shapes`` pictures and ``shapes-captions`` has them described in sentences (no reference model was
trained on either: they are for fine-tuning)."""
_SUBMODULES = ("captions", "evaluate", "processing", "relations", "render", "scenes", "tasks", "videos")


def models_dir() -> Path:
    """Where the reference models are: ``$VLMOPT_MODELS`` if set (e.g. for a non-editable install),
    else the repository's ``models/`` directory next to the ``vlmopt`` package."""
    import os

    import vlmopt

    override = os.environ.get("VLMOPT_MODELS")
    return Path(override) if override else Path(vlmopt.__file__).resolve().parent.parent / "models"


def path(name: str | Path) -> Path:
    """Directory of the reference model ``name``; an existing local path is returned as is.

    Raises ``FileNotFoundError`` (naming the known models) for anything else.
    """
    local = Path(name)
    if local.exists():
        return local
    candidate = models_dir() / str(name)
    if str(name) in MODEL_NAMES and (candidate / "config.json").exists():
        return candidate
    raise FileNotFoundError(
        f"no reference model {str(name)!r}: known models are {', '.join(MODEL_NAMES)} "
        f"(in {models_dir()}); to load another model, pass the path of a local model directory"
    )


def load(name: str | Path, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, processor)`` of a reference model, loaded offline with ``from_pretrained``; model in eval mode.

    ``dtype`` defaults to ``torch.float32``. The processor is ``AutoProcessor.from_pretrained``, or
    for Qwen2.5-VL and Qwen3-VL without torchvision the same processor minus its video processor (see
    :func:`vlmopt.reference.processing.load_processor`); use :func:`vlmopt.reference.processing.encode`
    to turn samples (images or videos) into model inputs.
    """
    import torch
    from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    from vlmopt.reference.processing import load_processor

    directory = path(name)
    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    classes = {
        "llava": LlavaForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": Qwen3VLForConditionalGeneration,
    }
    if model_type not in classes:
        raise ValueError(f"{directory} holds a {model_type!r} model; expected one of {sorted(classes)}")
    model = classes[model_type].from_pretrained(directory, dtype=dtype or torch.float32, local_files_only=True)
    return model.eval(), load_processor(directory)


def task_for(name: str | Path, task: str):
    """Task ``task`` configured as model ``name`` was trained and evaluated on it (``tasks.json``);
    ``shapes-relations`` and ``shapes-captions`` take the model's ``shapes`` configuration (the same pictures)."""
    from vlmopt.reference import tasks

    if task not in TASK_NAMES:
        raise KeyError(f"unknown task {task!r}; known tasks: {', '.join(TASK_NAMES)}")
    file = path(name) / "tasks.json"
    base = getattr(tasks.TASKS[task], "base", task)  # a task asking new questions about another's pictures
    overrides = json.loads(file.read_text()).get(base) if file.exists() else None
    if overrides is None:
        raise KeyError(f"model {str(name)!r} was not trained on task {task!r} (see {file})")
    return tasks.get(task, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def __getattr__(attr: str):
    if attr in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{attr}")
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["MODEL_NAMES", "TASK_NAMES", "load", "models_dir", "path", "task_for", *_SUBMODULES]
