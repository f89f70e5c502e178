"""Reference losses for ReGATE: a frozen teacher's per-token loss on the answer tokens.

:func:`teacher_losses` runs, without gradients, the student VLM's own language model or any causal
LM that shares the student's tokenizer, and returns the per-token cross-entropy in the layout of the
training graph's ``token_losses`` (target-aligned, 0 where ``labels`` is -100). A token whose loss
stays high without the image is a token that needs the image: ReGATE keeps it in the loss
(`arXiv 2507.21420 <https://arxiv.org/abs/2507.21420>`_). What the teacher sees of the picture
(``visual``, :data:`TEACHER_VIEWS`):

* ``"pad"`` (the paper's teacher): the language model alone, every visual token replaced by the
  padding token (attended like any token), every token at the position the VLM gives it, so the
  sequence keeps its length and positions;
* ``"drop"``: the language model alone on the text tokens, the visual tokens removed (the same as
  padding them and masking them out of attention: positions are kept);
* ``"image"``: the whole VLM on the batch as given. Give it the batch of a *blank picture* (the same
  samples with :meth:`vlmopt.reference.tasks.Sample.text_only`'s uniform grey image, so the same
  tokens): the teacher then sees inputs like those it was trained on, with nothing in them.

Call it once per sample at the start of training (the paper's teacher is the student frozen
before fine-tuning) and cache the result by sample id; pass it as the batch's ``teacher_losses``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlmopt.errors import InputError
from vlmopt.graph.training import answer_tokens, token_losses

TEACHER_VIEWS = ("pad", "drop", "image")
"""What :func:`teacher_losses`' teacher sees of the picture (see the module docstring)."""


def _positions_1d(attention_mask: Tensor) -> Tensor:
    size, length = attention_mask.shape
    return torch.arange(length, device=attention_mask.device).expand(size, length)


def _text_only(ids: Tensor, mask: Tensor, positions: Tensor, labels: Tensor, visual: Tensor):
    """Remove the visual tokens (``visual`` [B, S] bool) from every row, left-padding the rows to one
    length; returns (ids, mask, positions, labels, kept index [B, K] into S, -1 for padding)."""
    keep = ~visual
    counts = keep.sum(1)
    width = int(counts.max())
    rank = keep.long().cumsum(1) - 1 + (width - counts)[:, None]  # slot of each kept token, right-aligned
    index = torch.full((ids.shape[0], width), -1, dtype=torch.long, device=ids.device)
    rows, cols = keep.nonzero(as_tuple=True)
    index[rows, rank[rows, cols]] = cols
    safe = index.clamp(min=0)
    real = index >= 0
    new_positions = positions.gather(-1, safe.expand(positions.shape[:-1] + safe.shape[-1:]).contiguous())
    return (
        torch.where(real, ids.gather(1, safe), 0),
        torch.where(real, mask.gather(1, safe), 0),
        torch.where(real, new_positions, 0),
        torch.where(real, labels.gather(1, safe), -100),
        index,
    )


def _check_tokenizer(teacher: nn.Module, student: nn.Module, tokenizers) -> None:
    if tokenizers is not None:
        ours, theirs = tokenizers
        if ours.get_vocab() != theirs.get_vocab():
            raise InputError(
                "the teacher's tokenizer differs from the student's (their vocabularies differ): its losses would "
                "score other tokens; use a teacher trained with the student's tokenizer"
            )
    student_text, teacher_config = student.config.get_text_config(), teacher.config
    for field in ("vocab_size", "bos_token_id", "eos_token_id"):
        mine, theirs = getattr(student_text, field, None), getattr(teacher_config, field, None)
        comparable = field == "vocab_size" or (mine is not None and theirs is not None)
        if comparable and mine != theirs:
            raise InputError(
                f"the teacher does not share the student's tokenizer ({field}: teacher {theirs}, student {mine}); "
                "use a causal LM with the student's tokenizer, or the student itself (its text-only LM)"
            )


@torch.no_grad()
def teacher_losses(
    teacher: nn.Module, batch: dict[str, Any], *, student: nn.Module | None = None, tokenizers=None,
    visual: str = "pad", pad_token_id: int | None = None,
) -> Tensor:
    """[B, S] float32 reference losses of ``batch``'s answer tokens (``batch["labels"]``, -100 for none).

    ``teacher`` is either a supported VLM (``visual="pad"`` or ``"drop"``: its own language model and
    LM head on the text, every other token at the position the VLM gives it, 1-D or M-RoPE;
    ``"image"``: the whole VLM on the batch), or any causal LM (``*ForCausalLM``) sharing the
    tokenizer of ``student``, the VLM the batch was built for (required then; the LM sees the tokens
    at their sequence indices as 1-D positions). ``visual`` says what becomes of the visual tokens
    (:data:`TEACHER_VIEWS`, the module docstring); ``pad_token_id`` (``"pad"``) defaults to the
    student's configured padding token. ``tokenizers=(student's, teacher's)`` also compares the
    vocabularies. Losses are target-aligned like the training graph's ``token_losses``.
    """
    from vlmopt.adapters import adapter_for

    if visual not in TEACHER_VIEWS:
        raise InputError(f"teacher_losses: visual must be one of {', '.join(TEACHER_VIEWS)}, got {visual!r}")
    labels = batch.get("labels")
    ids = batch.get("input_ids")
    if labels is None or ids is None or labels.shape != ids.shape:
        raise InputError("teacher_losses needs the batch's input_ids and labels [batch, sequence], of one shape")
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_ids", "teacher_losses")}
    is_vlm = hasattr(teacher.config, "vision_config")
    if visual == "image":
        if not is_vlm:
            raise InputError(f"teacher_losses(visual='image') runs a VLM on the pictures; {type(teacher).__name__} has no vision tower "
                             "(use visual='pad' or 'drop' for a text-only LM)")
        return token_losses(teacher(**inputs, use_cache=False).logits, labels.long())
    vlm = teacher if is_vlm else student
    if vlm is None:
        raise InputError(
            f"teacher {type(teacher).__name__} is a text-only LM: pass student=<the VLM> so its visual tokens "
            "can be found and removed"
        )
    adapter = adapter_for(vlm)
    prompt = adapter.plan(inputs, for_generation=False)
    mask = prompt.inputs["attention_mask"]
    is_visual = torch.zeros_like(ids, dtype=torch.bool)
    if "visual_positions" in prompt.inputs:
        is_visual.view(-1)[prompt.inputs["visual_positions"]] = True
    if is_vlm:
        positions, language_model, head = prompt.inputs["position_ids"], adapter.text_model, teacher.lm_head
    else:
        _check_tokenizer(teacher, vlm, tokenizers)
        positions, language_model, head = _positions_1d(mask), teacher.get_decoder(), teacher.get_output_embeddings()
    if visual == "pad":
        pad = pad_token_id if pad_token_id is not None else getattr(vlm.config.get_text_config(), "pad_token_id", None)
        if pad is None:
            raise InputError("teacher_losses(visual='pad'): the student's config names no padding token; pass "
                             "pad_token_id=<the tokenizer's pad_token_id>")
        padded = torch.where(is_visual, torch.full_like(ids, int(pad)), ids)
        hidden = language_model(input_ids=padded, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
        return token_losses(head(hidden), labels.long())
    kept_ids, kept_mask, kept_positions, kept_labels, index = _text_only(ids, mask, positions, labels.long(), is_visual)
    hidden = language_model(
        input_ids=kept_ids, attention_mask=kept_mask, position_ids=kept_positions, use_cache=False
    ).last_hidden_state
    losses = token_losses(head(hidden), kept_labels)
    out = losses.new_zeros(ids.shape)
    real = index >= 0
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(index)
    out[rows[real], index[real]] = losses[real]
    return out


class TeacherCache:
    """Teacher losses of each sample's answer tokens, by sample id (``vlmopt regate precompute``).

    Give it to ReGATE with ``compiled.pass_state("regate").teacher_cache = TeacherCache.load(path)``: a
    batch with ``sample_ids`` and no ``teacher_losses`` then reads its reference losses here.
    """

    format = "vlmopt-teacher-losses/1"

    def __init__(self, losses: dict[int, Tensor] | None = None, meta: dict[str, Any] | None = None) -> None:
        self.losses: dict[int, Tensor] = dict(losses or {})
        """Per sample id: [n_answer] float32 teacher losses of its answer tokens, in order."""
        self.meta: dict[str, Any] = dict(meta or {})
        """Where the losses came from (model, task, split), for the record."""

    def __len__(self) -> int:
        return len(self.losses)

    def __contains__(self, sample: int) -> bool:
        return sample in self.losses

    def add(self, sample_ids, labels: Tensor, losses: Tensor) -> None:
        """Record ``losses`` [B, S] (as :func:`teacher_losses` returns them) of a batch's answer tokens."""
        answer = answer_tokens(labels)
        for row, sample in enumerate(sample_ids):
            self.losses[int(sample)] = losses[row][answer[row]].detach().float().cpu().clone()

    def for_batch(self, sample_ids, labels: Tensor) -> Tensor:
        """[B, S] float32 teacher losses of a batch (0 off the answer tokens), on ``labels``' device."""
        answer = answer_tokens(labels)
        out = torch.zeros(labels.shape)
        for row, sample in enumerate(sample_ids):
            known = self.losses.get(int(sample))
            if known is None:
                raise InputError(
                    f"no teacher losses for sample id {sample} in the cache ({len(self)} samples); precompute them "
                    "for every training sample (vlmopt regate precompute)"
                )
            count = int(answer[row].sum())
            if known.numel() != count:
                raise InputError(
                    f"the cache holds {known.numel()} teacher losses for sample id {sample}, but its labels have "
                    f"{count} answer tokens: the cache was made for other samples or another tokenizer"
                )
            out[row, answer[row].cpu()] = known
        return out.to(labels.device)

    def save(self, path) -> None:
        torch.save({"format": self.format, "meta": self.meta, "losses": self.losses}, path)

    @classmethod
    def load(cls, path) -> TeacherCache:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != cls.format:
            raise InputError(f"{path} is not a teacher-loss cache ({cls.format}); write one with vlmopt regate precompute")
        return cls({int(k): v for k, v in saved["losses"].items()}, saved["meta"])
