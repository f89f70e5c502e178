"""Labels and gradient bookkeeping shared by the training tests."""

from __future__ import annotations

import torch

from vlmopt import configs


def random_labels(batch: dict, seed: int, fraction: float = 0.5) -> torch.Tensor:
    """Labels [B, S]: the input ids on a seeded random ``fraction`` of the real text tokens, -100 elsewhere
    (padding and visual tokens never carry a loss)."""
    generator = torch.Generator().manual_seed(seed)
    ids = batch["input_ids"]
    labels = ids.clone()
    text = batch["attention_mask"].bool() & (ids >= configs.FIRST_TEXT_TOKEN)
    if "mm_token_type_ids" in batch:
        text &= batch["mm_token_type_ids"] == 0
    chosen = torch.rand(ids.shape, generator=generator) < fraction
    labels[~(text & chosen)] = -100
    return labels


def gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Backpropagate ``loss`` and take the model's gradients (each parameter's, or None), leaving none behind."""
    for parameter in model.parameters():
        parameter.grad = None
    loss.backward()
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    for parameter in model.parameters():
        parameter.grad = None
    return grads
