"""Training a compiled model with Hugging Face's ``Trainer``.

>>> opt = vlmopt.compile(model, [vlmopt.passes.ReGATE(keep=0.5)], mode="train")
>>> trainer = vlmopt.train.CompiledTrainer(opt, args=TrainingArguments(..., remove_unused_columns=False),
...                                        train_dataset=dataset, data_collator=collate)
>>> trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

The Trainer trains the user's model (the compiled model holds its parameters, so the optimizer,
the checkpoints and ``save_model`` are the usual ones); only the loss comes from the compiled
training graph (``compute_loss``). The train-stage passes' state (ReGATE's EMAs and step) is saved
beside every checkpoint (``vlmopt_pass_states.pt``) and restored when training resumes from one.

Batches are the compiled model's inputs: processor outputs, ``labels``, and optionally
``sample_ids`` and ``teacher_losses`` — keep ``remove_unused_columns=False`` so that the Trainer
does not drop the columns the HF model's ``forward`` does not name.

Resuming and reloading the best checkpoint at the end (``load_best_model_at_end``) read the
checkpoint's weights with the model's own checkpoint key conversion, as ``from_pretrained`` does
(:func:`vlmopt.train.checkpoint.load_weights`; HF's ``Trainer`` loads them with plain
``load_state_dict``, which for VLMs saved in their original key format loads nothing), single-file or
sharded, into the model's parameters in place; a checkpoint whose weights do not all load is refused
with a :class:`~vlmopt.errors.CheckpointError` naming the folder and the keys. The best checkpoint's
pass states come back with its weights. DeepSpeed, FSDP and adapter-only (PEFT) checkpoints are left
to the Trainer's own loaders.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainerCallback

from vlmopt.errors import InputError
from vlmopt.train.checkpoint import load_weights, weight_files

#: File of the passes' training state inside a Trainer checkpoint directory.
STATE_FILE = "vlmopt_pass_states.pt"


class _SavePassStates(TrainerCallback):
    def __init__(self, compiled) -> None:
        self.compiled = compiled

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(self.compiled.pass_states.get_extra_state(), os.path.join(folder, STATE_FILE))
        return control


class CompiledTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is the compiled training graph's (see the module docstring)."""

    def __init__(self, compiled, *args, **kwargs) -> None:
        if not getattr(compiled, "training_graph", False):
            raise InputError('CompiledTrainer needs a model compiled with mode="train"')
        self.compiled = compiled
        kwargs.setdefault("model", compiled.adapter.model)
        super().__init__(*args, **kwargs)
        # The graph's loss is already the mean over its active tokens; the Trainer must not rescale it.
        self.model_accepts_loss_kwargs = False
        self.add_callback(_SavePassStates(compiled))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = self.compiled(**inputs)
        return (out.loss, out) if return_outputs else out.loss

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        folder = resume_from_checkpoint
        if folder is True:
            from transformers.trainer_utils import get_last_checkpoint

            folder = get_last_checkpoint(self.args.output_dir)
        if isinstance(folder, str):
            path = os.path.join(folder, STATE_FILE)
            if not os.path.exists(path):
                raise InputError(f"{folder} holds no {STATE_FILE}: it was not saved by a CompiledTrainer")
            self._restore_pass_states(path)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _loads_weights_itself(self, folder: str) -> bool:
        """Does this trainer read ``folder``'s weights (a plain model and full-model weight files), rather
        than the Trainer's DeepSpeed, FSDP, SageMaker or adapter loaders?"""
        from transformers.utils import is_sagemaker_mp_enabled

        plain = not (self.is_deepspeed_enabled or self.is_fsdp_enabled or is_sagemaker_mp_enabled())
        return plain and bool(weight_files(folder))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._loads_weights_itself(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        folder = self.state.best_model_checkpoint
        if not self._loads_weights_itself(folder):
            return super()._load_best_model()
        load_weights(self.model, folder)
        path = os.path.join(folder, STATE_FILE)
        if os.path.exists(path):  # the passes' state goes with the weights it was trained beside
            self._restore_pass_states(path)

    def _restore_pass_states(self, path: str) -> None:
        self.compiled.pass_states.set_extra_state(torch.load(path, map_location="cpu", weights_only=True))
