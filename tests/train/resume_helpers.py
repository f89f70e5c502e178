"""Training runs of CompiledTrainer for the resume tests: an uninterrupted run with the weights of every
step, and a run resumed from a checkpoint on a model built afresh (importable by a child process)."""

from __future__ import annotations

import torch
from transformers import TrainerCallback, TrainingArguments

import vlmopt
from tests.conftest import padded_batch
from tests.train.train_helpers import random_labels
from vlmopt import configs
from vlmopt.adapters import families
from vlmopt.passes import ReGATE

#: Steps of a whole run; the uninterrupted run saves a checkpoint every SAVE_EVERY of them.
STEPS, SAVE_EVERY = 4, 2

#: ReGATE with its first sparse cycle beginning at step 2 (dense at 0 and 1, sparse at 2 and 3, dense at 4):
#: a resume from checkpoint-2 lands mid-cycle, with EMAs to carry over.
REGATE = ReGATE(keep=0.5, warmup_steps=1, cycle=3, dense_steps=1)


def tiny_configs() -> list[str]:
    """One tiny random config (``tiny-*-random``) per HF model class of every registered family, so that
    a family added later is covered without editing the tests."""
    chosen: dict[str, str] = {}
    for family in families():
        for name, named in family.configs.items():
            if name.startswith("tiny-") and name.endswith("-random"):
                chosen.setdefault(family.model_classes[named.make().model_type], name)
    return list(chosen.values())


def build(name: str, seed: int):
    """The tiny model ``name`` with seeded random weights."""
    return configs.build(configs.CONFIGS[name](), seed=seed)


def dataset(model) -> list[dict]:
    """Three batches of two samples (processor-like inputs, labels, sample ids), fixed seeds."""
    items = []
    for index, seed in enumerate((81, 83, 85)):
        batch = padded_batch(model, seed=seed)
        labels = random_labels(batch, seed=seed + 1, fraction=0.8)
        items.append({**batch, "labels": labels, "sample_ids": torch.tensor([2 * index, 2 * index + 1])})
    return items


def arguments(folder, steps: int = STEPS, **extra) -> TrainingArguments:
    """CPU training arguments: one batch a step, constant learning rate, a checkpoint every SAVE_EVERY steps
    in ``folder`` (``extra`` overrides any of them)."""
    settings = {
        "output_dir": str(folder), "max_steps": steps, "per_device_train_batch_size": 1, "learning_rate": 0.05,
        "save_steps": SAVE_EVERY, "report_to": [], "use_cpu": True, "remove_unused_columns": False,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True,
    }
    return TrainingArguments(**{**settings, **extra})


def weights(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter and persistent buffer, by state-dict key."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


class Weights(TrainerCallback):
    """Records the model's weights when training begins and after every step."""

    def __init__(self) -> None:
        self.at_begin: dict[str, torch.Tensor] = {}
        self.at_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at_begin = weights(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.at_step[state.global_step] = weights(model)


def trainer(compiled, data, folder, recorder: Weights, **extra) -> vlmopt.train.CompiledTrainer:
    """A CompiledTrainer of :func:`arguments` (``extra`` overrides them) on batches that are the dataset's items."""
    return vlmopt.train.CompiledTrainer(
        compiled, args=arguments(folder, **extra), train_dataset=data, data_collator=lambda items: items[0],
        callbacks=[recorder],
    )


def uninterrupted(name: str, folder) -> dict:
    """STEPS steps of ReGATE training on ``name`` (seed 1), a checkpoint every SAVE_EVERY steps in ``folder``:
    the weights after every step and the final ReGATE state."""
    model = build(name, seed=1)
    compiled = vlmopt.compile(model, [REGATE], mode="train")
    recorder = Weights()
    trainer(compiled, dataset(model), folder, recorder).train()
    return {"at_step": recorder.at_step, "regate": compiled.pass_state("regate").state_dict()}


def resumed(name: str, checkpoint: str, folder, seed: int = 2, steps: int = STEPS) -> dict:
    """The run of :func:`uninterrupted` resumed from ``checkpoint`` up to step ``steps`` on a model built
    afresh with other initial weights (seed ``seed``): its weights before resuming, when training begins
    (the checkpoint loaded), at the end, and the final ReGATE state."""
    model = build(name, seed=seed)
    compiled = vlmopt.compile(model, [REGATE], mode="train")
    before = weights(model)
    recorder = Weights()
    trainer(compiled, dataset(model), folder, recorder, max_steps=steps).train(resume_from_checkpoint=str(checkpoint))
    return {
        "before": before, "at_begin": recorder.at_begin, "end": weights(model),
        "regate": compiled.pass_state("regate").state_dict(),
    }
