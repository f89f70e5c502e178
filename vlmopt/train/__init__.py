"""Training with compiled models: the training step of a ``mode="train"`` model, and reference losses.

>>> opt = vlmopt.compile(model, passes=[vlmopt.passes.ReGATE(keep=0.5)], mode="train")
>>> reference = vlmopt.train.teacher_losses(model, {**batch, "labels": labels})   # once, before training
>>> out = opt(**batch, labels=labels, sample_ids=ids, teacher_losses=reference)
>>> out.loss.backward()                                   # out.token_losses, out.active_tokens

Fine-tuning a reference model on a task, standard and with ReGATE side by side, with held-out
scores along the way, until each plateaus: :func:`vlmopt.train.finetune.finetune` (``vlmopt finetune``;
resumable through :mod:`vlmopt.train.finetune_state`); what it shows (peaks, steps and seconds to the
standard run's peak): :mod:`vlmopt.train.finetune_report`.
"""

from vlmopt.train.step import TrainingOutput, TrainingStep, training_forward
from vlmopt.train.teacher import TeacherCache, teacher_losses

__all__ = ["CompiledTrainer", "TeacherCache", "TrainingOutput", "TrainingStep", "teacher_losses", "training_forward"]


def __getattr__(name: str):
    if name == "CompiledTrainer":  # imported on use: the HF Trainer brings accelerate along
        from vlmopt.train.hf import CompiledTrainer

        return CompiledTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
