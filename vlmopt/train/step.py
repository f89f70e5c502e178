"""One training step of a ``mode="train"`` compiled model: checked inputs, the training graph, the
train-stage passes' state.

``CompiledVLM.forward(**batch, labels=labels)`` lands in :func:`training_forward`. Besides the
processor outputs and ``labels`` [B, S] (``-100`` where a token carries no loss, as for HF), a batch
may carry inputs for train-stage passes: ``sample_ids`` [B] (one whole number per sample, stable
across epochs) and ``teacher_losses`` [B, S] float (per-token losses of a reference model,
target-aligned as :func:`vlmopt.train.teacher_losses` returns them).

A step runs without a KV cache. The passes' state advances only on steps run with gradients
enabled: a forward under ``torch.no_grad()`` (evaluation) reads the state but never changes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from vlmopt.errors import InputError
from vlmopt.graph.training import TRAIN_STAGE_OF, answer_tokens

if TYPE_CHECKING:
    from vlmopt.passes.base import Pass
    from vlmopt.runtime import CompiledVLM

#: Batch entries read by train-stage passes (not by the graphs' planning).
TRAINING_KEYS = ("sample_ids", "teacher_losses")


@dataclass
class TrainingOutput(ModelOutput):
    """What a training step returns (indexable like HF outputs)."""

    loss: Tensor | None = None
    """[] float32: mean cross-entropy over the active tokens (HF's ``loss`` when all answer tokens are)."""
    logits: Tensor | None = None
    """[B, S', V] (S' = the sequence length after passes that drop tokens)."""
    token_losses: Tensor | None = None
    """[B, S'] float32: each target token's loss at its own position, 0 where no answer token."""
    active_tokens: Tensor | None = None
    """[B, S'] bool: the tokens whose losses make ``loss``."""


@dataclass
class TrainingStep:
    """One step's batch, as train-stage passes see it (all in the input's sequence coordinates)."""

    labels: Tensor
    """[B, S] int64, -100 where no loss."""
    answer: Tensor
    """[B, S] bool: the answer tokens (targets that may carry the loss)."""
    sample_ids: list[int] | None
    """One id per sample, or None when the batch carries none."""
    teacher_losses: Tensor | None
    """[B, S] float32 reference losses, or None."""
    grad: bool
    """Does this step train (gradients enabled), so that pass state advances?"""


class PassStates(nn.Module):
    """The train-stage passes' states, by pass name; saved in the owning module's ``state_dict``
    (as ``pass_states._extra_state``) and restored by ``load_state_dict``."""

    def __init__(self, passes: tuple[Pass, ...]) -> None:
        super().__init__()
        self.states = {p.name(): state for p in passes if (state := p.new_state()) is not None}

    def get_extra_state(self) -> dict[str, Any]:
        return {name: state.state_dict() for name, state in self.states.items()}

    def set_extra_state(self, saved: dict[str, Any]) -> None:
        if set(saved) != set(self.states):
            raise InputError(
                f"the saved training state is for passes {sorted(saved) or 'none'}, but this model's "
                f"train-stage passes with a state are {sorted(self.states) or 'none'}"
            )
        for name, state in self.states.items():
            state.load_state_dict(saved[name])


def _check_labels(labels: Tensor | None, input_ids: Tensor | None) -> Tensor:
    if labels is None:
        raise InputError(
            'a model compiled with mode="train" runs training steps: pass labels [batch, sequence] '
            "(-100 where a token carries no loss); use generate() to run it without labels"
        )
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise InputError(f"labels must be an integer tensor [batch, sequence], got {getattr(labels, 'dtype', type(labels))}")
    if input_ids is not None and labels.shape != input_ids.shape:
        raise InputError(
            f"labels have shape {tuple(labels.shape)} but input_ids have {tuple(input_ids.shape)}; give one "
            "label per input token (-100 for tokens without loss), unshifted, as for the HF model"
        )
    return labels.long()


def _sample_ids(value: Any, size: int) -> list[int] | None:
    if value is None:
        return None
    ids = value.tolist() if isinstance(value, Tensor) else list(value)
    if len(ids) != size or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise InputError(f"sample_ids must hold one whole number per sample ({size}), got {ids!r}")
    return ids


def _teacher_losses(value: Any, labels: Tensor) -> Tensor | None:
    if value is None:
        return None
    if not isinstance(value, Tensor) or value.shape != labels.shape:
        raise InputError(
            f"teacher_losses must be a float tensor shaped like labels {tuple(labels.shape)}, got "
            f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
        )
    return value.float()


def training_forward(
    compiled: CompiledVLM, batch: dict[str, Any], labels: Tensor | None, past_key_values, use_cache, logits_to_keep: int
) -> TrainingOutput:
    """Run one training step (see the module docstring)."""
    if past_key_values is not None or use_cache:
        raise InputError("a training step runs without a KV cache; drop past_key_values / use_cache")
    if logits_to_keep:
        raise InputError("a training step needs the logits of every token; drop logits_to_keep")
    labels = _check_labels(labels, batch.get("input_ids"))
    extras = {key: batch.pop(key, None) for key in TRAINING_KEYS}
    prompt = compiled.plan(batch)
    step = TrainingStep(
        labels=labels,
        answer=answer_tokens(labels),
        sample_ids=_sample_ids(extras["sample_ids"], labels.shape[0]),
        teacher_losses=_teacher_losses(extras["teacher_losses"], labels),
        grad=torch.is_grad_enabled(),
    )
    states = compiled.pass_states.states
    inputs = {**prompt.inputs, "labels": labels}
    for item in compiled.passes:
        inputs.update(item.training_inputs(states.get(item.name()), step))
    out = compiled.run_stage(TRAIN_STAGE_OF[prompt.stage], inputs, None, 0)
    for item in compiled.passes:
        item.after_training_step(states.get(item.name()), step, out)
    return TrainingOutput(
        loss=out["loss"], logits=out["logits"], token_losses=out["token_losses"], active_tokens=out["active_tokens"]
    )
