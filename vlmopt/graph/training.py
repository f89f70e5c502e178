"""The training graph: a prefill graph that also takes ``labels`` and ends in the loss.

``compile(model, passes, mode="train")`` adds a ``train_prefill`` stage (the ``prefill`` pipeline, with
visual inputs) and a ``train_text`` stage (the text-only prefill) to the captured graphs (not
``train``: a stage is a submodule of the compiled model, and ``nn.Module`` owns ``train`` and ``training``). Each is a
fresh capture of the prefill pipeline, run without a KV cache (``cache=None``, all logits kept),
edited here to take one more input and to end in three more nodes:

- ``labels`` [B, S] int64, a sequence-carrying input (``meta["seq_dim"] = (0, 1)``), so a pass that
  drops tokens of the LLM sequence gathers the labels with the hidden states;
- ``answer_tokens`` [B, S] bool (role ``answer_tokens``): the target tokens that may carry the loss,
  ``labels != -100`` shifted so that position ``i`` is the target of the prediction made at ``i-1``
  (position 0 is never a target);
- ``token_losses`` [B, S] float32 (role ``token_loss``): ``-log p(labels[b, i] | tokens < i)`` at
  every answer token, 0 elsewhere (logits upcast to float32 first, as HF's ``ForCausalLMLoss``);
- ``loss`` [] float32 (role ``loss_reduce``): the mean of ``token_losses`` over the active tokens
  (``answer_tokens`` unless a train-stage pass narrows them), i.e. HF's ``loss`` for
  ``model(**batch, labels=labels)``: shifted cross-entropy, ``ignore_index=-100``, averaged over the
  counted tokens. A batch without any answer token gives a loss of 0 (HF gives NaN), so one empty
  batch cannot poison the weights.

Losses are aligned with the *targets* (``labels``), not the predicting positions, so a token's loss
sits at the token's own position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from vlmopt.graph.edit import GraphEditor

#: Label value of tokens that carry no loss (HF's ``ignore_index``).
IGNORE_INDEX = -100

#: The training stage that serves each prefill stage.
TRAIN_STAGE_OF = {"prefill": "train_prefill", "prefill_text": "train_text"}


def answer_tokens(labels: Tensor) -> Tensor:
    """[B, S] bool: ``labels[b, i] != -100`` for ``i ≥ 1`` (position 0 has no prediction before it)."""
    targets = labels[:, 1:] != IGNORE_INDEX
    return torch.cat([targets.new_zeros((labels.shape[0], 1)), targets], dim=1)


def token_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """[B, S] float32 per-token cross-entropy, target-aligned; 0 where ``labels`` is -100 and at 0.

    ``logits`` [B, S, V] (any float dtype; upcast to float32 as HF does), ``labels`` [B, S] int.
    """
    size, length, vocab = logits.shape
    shifted = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(size, length - 1)
    return F.pad(shifted, (1, 0))


def reduce_loss(losses: Tensor, active: Tensor) -> Tensor:
    """[] mean of ``losses`` [B, S] over the True entries of ``active`` [B, S] (0 when none)."""
    counted = active.sum()
    return (losses * active).sum() / counted.clamp(min=1)


def add_training_outputs(module: fx.GraphModule) -> fx.GraphModule:
    """Turn a freshly captured prefill graph into a training graph (see the module docstring).

    The graph's output dict gains ``loss``, ``token_losses`` and ``active_tokens`` (and keeps
    ``logits`` and ``attention_mask``).
    """
    editor = GraphEditor(module)
    labels = editor.add_input("labels", role="input", stage="llm", seq_dim=(0, 1))
    output = editor.output()
    results = dict(output.args[0])
    logits = results["logits"]
    chain = editor.chain(logits)
    answer = chain(answer_tokens, labels, role="answer_tokens", stage="loss", name="answer_tokens")
    losses = chain(token_losses, logits, labels, role="token_loss", stage="loss", name="token_losses")
    loss = chain(reduce_loss, losses, answer, role="loss_reduce", stage="loss", name="loss")
    output.args = ({**results, "loss": loss, "token_losses": losses, "active_tokens": answer},)
    editor.finish()
    return module
