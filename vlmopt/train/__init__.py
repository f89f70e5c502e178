"""Training with compiled models: the training step of a ``mode="train"`` model, and reference losses.

>>> opt = vlmopt.compile(model, passes=[vlmopt.passes.ReGATE(keep=0.5)], mode="train")
>>> out = opt(**batch, labels=labels, sample_ids=ids)   # out.loss, out.token_losses, out.active_tokens
"""

from vlmopt.train.step import TrainingOutput, TrainingStep, training_forward

__all__ = ["TrainingOutput", "TrainingStep", "training_forward"]
