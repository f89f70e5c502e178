"""ReGATE — spend the training loss on the answer tokens that still need it.

`ReGATE: Learning Faster and Better with Fewer Tokens in MLLMs <https://arxiv.org/abs/2507.21420>`_.
A train-stage pass: ``vlmopt.compile(model, [ReGATE(keep=0.5)], mode="train")``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from vlmopt.errors import IncompatiblePassError, InputError, PassConfigError
from vlmopt.graph.edit import GraphEditor
from vlmopt.graph.elide import elide_decoder, elision_index
from vlmopt.graph.training import TRAIN_STAGE_OF
from vlmopt.passes.base import Pass, check_range

if TYPE_CHECKING:
    from vlmopt.graph.pipeline import VLMGraph
    from vlmopt.train.step import TrainingStep


TEACHERS = {"pad": "pad", "blank": "image", "drop": "drop"}
"""ReGATE's teachers, each the student frozen before fine-tuning, and what
:func:`vlmopt.train.teacher_losses` is told it sees (``visual``): ``pad``, the paper's (its language
model, the visual tokens replaced by padding, positions kept); ``blank``, the whole model on a blank
(uniform grey) picture of the same size; ``drop``, its language model with the visual tokens removed."""


def unpack_answers(packed: Tensor, answer: Tensor, fill: float) -> Tensor:
    """[B, S] float: ``packed`` [B, A] (one value per answer token, in order) put at the answer
    tokens of ``answer`` [B, S] bool, ``fill`` elsewhere. Keyed by answer ordinal, so the values
    follow the answer tokens through any pass that drops other tokens of the sequence."""
    ordinal = (answer.long().cumsum(1) - 1).clamp(0, packed.shape[1] - 1)
    return torch.where(answer, packed.gather(1, ordinal), torch.full_like(packed[:, :1], fill))


def pack_answers(values: Tensor, answer: Tensor, like: Tensor) -> Tensor:
    """[B, A] (A = ``like``'s width): the inverse of :func:`unpack_answers`, NaN past each row's answers."""
    ordinal = (answer.long().cumsum(1) - 1).clamp(min=0)
    slots = torch.where(answer, ordinal, like.shape[1])  # non-answer tokens land in a dropped column
    packed = like.new_full((like.shape[0], like.shape[1] + 1), float("nan"))
    return packed.scatter(1, slots, values.to(packed.dtype))[:, :-1]


def update_ema(losses: Tensor, previous: Tensor, computed: Tensor, beta: float) -> Tensor:
    """[B, S] float32 EMA of the per-token loss after this step (no gradient): ``β·m + (1−β)·ℓ``, or
    ``ℓ`` where the token has no EMA yet (``previous`` NaN), at the ``computed`` tokens; ``previous``
    elsewhere (the EMA of a token whose loss this step did not compute stays as it was)."""
    losses = losses.detach()
    blended = torch.where(torch.isnan(previous), losses, beta * previous + (1 - beta) * losses)
    return torch.where(computed, blended, previous)


def difficulty(ema: Tensor, teacher: Tensor, lam: float) -> Tensor:
    """[B, S] score ``d = m + λ·ℓ_ref`` (higher = keep)."""
    return ema + lam * teacher


def prior_difficulty(previous: Tensor, teacher: Tensor, lam: float) -> Tensor:
    """[B, S] score before this step's forward (``elide=True``): ``m + λ·ℓ_ref`` with the EMA of the
    earlier steps, and ``ℓ_ref`` standing in for the EMA of a token never computed yet (the teacher
    is the student before fine-tuning, without the image: the best prior for the student's loss)."""
    return torch.where(torch.isnan(previous), teacher, previous) + lam * teacher


@dataclass(frozen=True)
class ReGATE(Pass):
    """Only the hardest ``keep`` of each sequence's answer tokens carry the loss on sparse steps.

    Per answer token, a difficulty score ``d = m + λ·ℓ_ref``: ``m`` is the EMA of the student's own
    loss on that token (``m ← β·m + (1−β)·ℓ``), ``ℓ_ref`` a frozen text-only reference model's loss
    (:func:`vlmopt.train.teacher_losses`; high when the text alone cannot predict the token, i.e. it
    needs the image). The first ``warmup_steps`` steps, then the first ``dense_steps`` of every
    ``cycle`` steps, are dense (every answer token in the loss); on the other steps only the top
    ``keep`` of each sequence's answer tokens by ``d`` are (``vlmopt::regate_mask``, inserted
    between the per-token loss and the reduction). With the defaults about 56% of the answer tokens
    carry the loss ((16 + 112·0.5) / 128).

    Batch inputs: ``sample_ids`` [B] (whole numbers, the same sample the same id every epoch) key
    the EMAs; ``teacher_losses`` [B, S] give ``ℓ_ref`` (or ``pass_state("regate").teacher_cache``, a
    :class:`vlmopt.train.TeacherCache` read by sample id). Without ``teacher_losses`` the score is the
    EMA alone; without ``sample_ids`` the EMA has no memory across steps (the score uses this step's
    loss); each fallback warns once. The state (EMAs, step counter) lives in
    :class:`ReGATEState` (``compiled.pass_state("regate")``, and in ``compiled.state_dict()``), never in this
    frozen config.

    Choices the paper leaves open:

    - *EMA initialisation*: a token's first observed loss (no bias towards 0 or any constant).
    - *EMA and this step*: the score uses the EMA *after* folding in this step's loss, which the
      training graph computes for every answer token before the mask (``elide=False``).
    - *Inactive tokens' EMA*: updated too (their loss is computed anyway without elision), so a
      token that was left out is re-scored from fresh evidence.
    - *EMA key*: (sample id, ordinal of the token among the sample's answer tokens), independent of
      padding, batching and of passes that drop visual tokens; a sample whose answer length changes
      is refused.
    - *Top-k*: per sequence, ``⌈keep · n⌉`` of its ``n`` answer tokens (see ``vlmopt::regate_mask``).
    - *Loss*: the mean over the active tokens only (the standard loss restricted to them).
    - *Visual and instruction tokens*: never in the loss (labels -100, as in standard fine-tuning);
      only answer tokens are gated.
    - *Elision* (``elide=True``, :mod:`vlmopt.graph.elide`): the mask must be known before the
      decoder, so the score uses the EMA of the earlier steps (the teacher loss standing in for a
      token never computed), and only the active tokens' EMAs move. Visual and instruction tokens
      always stay in the decoder (they are the context the answer needs); an answer token is
      computed only when the next target is active (its own output feeds nothing else in the
      loss), and an elided token is no context for later tokens, as elision means. An elided
      token's final hidden state is its decoder input (every layer's residual update skipped).
    - *Evaluation*: a forward under ``torch.no_grad()`` uses every answer token and leaves the state
      alone; every forward with gradients is one step (count micro-batches accordingly).
    """

    stage: ClassVar[str] = "train"
    paper: ClassVar[str] = "https://arxiv.org/abs/2507.21420"

    keep: float = 0.5
    """Fraction of each sequence's answer tokens in the loss on sparse steps, in (0, 1]."""
    beta: float = 0.9
    """EMA decay of the student's per-token loss, in [0, 1)."""
    lam: float = 0.5
    """Weight λ of the reference (teacher) loss in the score, ≥ 0."""
    warmup_steps: int = 100
    """Dense steps at the start of training, ≥ 0."""
    cycle: int = 128
    """Length of a dense-then-sparse cycle after warm-up, in steps, ≥ 1."""
    dense_steps: int = 16
    """Dense steps at the start of every cycle, in [0, cycle]."""
    elide: bool = False
    """Also skip the decoder compute of the tokens whose prediction is not in the loss (token elision)."""
    teacher: str = "pad"
    """The frozen teacher that gives ``ℓ_ref`` (:data:`TEACHERS`; ``vlmopt finetune`` and ``vlmopt regate precompute`` build it)."""
    teacher_step: int = 0
    """The training step whose model ``vlmopt finetune`` freezes as the teacher, in [0, warmup_steps]: 0, the
    model before fine-tuning (the paper's); ``warmup_steps``, the student once warm-up has taught it the answers' form."""

    def __post_init__(self) -> None:
        check_range("ReGATE", "keep", self.keep, 0, 1, low_open=True)
        check_range("ReGATE", "beta", self.beta, 0, 1)
        if self.beta == 1:
            raise PassConfigError("ReGATE.beta must be in [0, 1), got 1 (the EMA would never move)")
        check_range("ReGATE", "lam", self.lam, 0, 1e6)
        check_range("ReGATE", "warmup_steps", self.warmup_steps, 0, 10**12, integer=True)
        check_range("ReGATE", "cycle", self.cycle, 1, 10**12, integer=True)
        check_range("ReGATE", "dense_steps", self.dense_steps, 0, self.cycle, integer=True)
        if not isinstance(self.elide, bool):
            raise PassConfigError(f"ReGATE.elide must be True or False, got {self.elide!r}")
        check_range("ReGATE", "teacher_step", self.teacher_step, 0, self.warmup_steps, integer=True)
        if self.teacher not in TEACHERS:
            raise PassConfigError(f"ReGATE.teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")

    def check(self, adapter, before) -> None:
        super().check(adapter, before)
        if any(isinstance(p, ReGATE) for p in before):
            raise IncompatiblePassError("ReGATE is listed twice: a training graph has one loss to gate; keep one")

    # ----- the graph ----------------------------------------------------------------------
    def apply(self, graph: VLMGraph) -> None:
        for stage in TRAIN_STAGE_OF.values():
            self.insert_mask(GraphEditor(graph[stage]))

    def insert_mask(self, editor: GraphEditor) -> None:
        inputs = {name: editor.add_input(name, role="input", stage="loss") for name in ("regate_ema", "teacher_losses", "regate_keep")}
        answer, losses, reduce = editor.one("answer_tokens"), editor.one("token_loss"), editor.one("loss_reduce")
        if self.elide:
            active, ema = self.insert_elided(editor, inputs, answer, losses)
        else:
            chain = editor.chain(losses)
            previous = chain(unpack_answers, inputs["regate_ema"], answer, float("nan"), role="regate_score", stage="loss", name="regate_ema_before")
            ema = chain(update_ema, losses, previous, answer, self.beta, role="regate_score", stage="loss", name="regate_ema_after")
            teacher = chain(unpack_answers, inputs["teacher_losses"], answer, 0.0, role="regate_score", stage="loss", name="teacher_losses_at")
            scores = chain(difficulty, ema, teacher, self.lam, role="regate_score", stage="loss", name="regate_scores")
            active = chain(
                torch.ops.vlmopt.regate_mask.default, scores, answer, inputs["regate_keep"],
                role="regate_mask", stage="loss", name="regate_active",
            )
        packed = editor.insert(ema if self.elide else active, pack_answers, (ema, answer, inputs["regate_ema"]),
                               role="regate_score", stage="loss", name="regate_ema_packed")
        editor.set_input(reduce, "active", active)
        output = editor.output()
        output.args = ({**output.args[0], "active_tokens": active, "regate_ema": packed},)
        editor.finish()

    def insert_elided(self, editor: GraphEditor, inputs: dict, answer, losses):
        """Decide the active tokens before the decoder (from the EMA before this step), run the decoder
        layers on the tokens they need only, and update the EMA of the active tokens only."""
        layers = sorted(editor.nodes("decoder_layer"), key=lambda n: n.meta["index"])
        layers[0].prepend(answer)  # it reads only the labels input
        chain = editor.chain(answer)
        previous = chain(unpack_answers, inputs["regate_ema"], answer, float("nan"), role="regate_score", stage="loss", name="regate_ema_before")
        teacher = chain(unpack_answers, inputs["teacher_losses"], answer, 0.0, role="regate_score", stage="loss", name="teacher_losses_at")
        scores = chain(prior_difficulty, previous, teacher, self.lam, role="regate_score", stage="loss", name="regate_scores")
        active = chain(
            torch.ops.vlmopt.regate_mask.default, scores, answer, inputs["regate_keep"],
            role="regate_mask", stage="loss", name="regate_active",
        )
        index = chain(elision_index, answer, active, role="elide_index", stage="llm", name="elide_index")
        elide_decoder(editor, index, layers, index)
        ema = editor.insert(losses, update_ema, (losses, previous, active, self.beta), role="regate_score", stage="loss",
                            name="regate_ema_after")
        return active, ema

    # ----- the state ----------------------------------------------------------------------
    def new_state(self) -> ReGATEState:
        return ReGATEState(self)

    def training_inputs(self, state: ReGATEState, step: TrainingStep) -> dict[str, Any]:
        device = step.labels.device
        counts = step.answer.sum(1).tolist()
        width = max(max(counts, default=0), 1)
        previous = torch.full((len(counts), width), float("nan"))
        if step.sample_ids is None:
            state.warn_once("sample_ids", "the batch has no sample_ids, so the loss EMA has no memory across steps "
                            "(scores use this step's losses); pass sample_ids [B] to key the EMAs")
        else:
            for row, (sample, count) in enumerate(zip(step.sample_ids, counts)):
                previous[row, :count] = state.ema_of(sample, count)
        teacher = torch.zeros((len(counts), width))
        given = step.teacher_losses
        if given is None and state.teacher_cache is not None and step.sample_ids is not None:
            given = state.teacher_cache.for_batch(step.sample_ids, step.labels)
        if given is None:
            state.warn_once("teacher_losses", "the batch has no teacher_losses (and no cache entry), so scores are the student's loss EMA "
                            "alone (lam is unused); see vlmopt.train.teacher_losses")
        else:
            teacher = pack_answers(given.cpu(), step.answer.cpu(), teacher).nan_to_num(0.0)
        keep = state.keep_now() if step.grad else 1.0
        return {"regate_ema": previous.to(device), "teacher_losses": teacher.to(device), "regate_keep": keep}

    def after_training_step(self, state: ReGATEState, step: TrainingStep, outputs: dict) -> None:
        if not step.grad:
            return
        if step.sample_ids is not None:
            packed = outputs["regate_ema"].detach().cpu()
            for row, (sample, count) in enumerate(zip(step.sample_ids, step.answer.sum(1).tolist())):
                state.ema[sample] = packed[row, :count].clone()
        state.step += 1


class ReGATEState:
    """ReGATE's training state: the step counter and the loss EMAs by (sample id, answer ordinal).

    ``state_dict()`` / ``load_state_dict()`` save and restore it (a resumed run continues exactly);
    a state saved under another ReGATE configuration is refused.
    """

    def __init__(self, config: ReGATE) -> None:
        self.config = config
        self.step = 0
        """Training steps taken (forwards with gradients)."""
        self.ema: dict[int, Tensor] = {}
        """Per sample id: [n_answer] float32 loss EMA of its answer tokens, in order."""
        self.teacher_cache = None
        """A :class:`vlmopt.train.TeacherCache` read for batches with ``sample_ids`` but no
        ``teacher_losses`` (not saved in the state: it is data, rebuilt by ``vlmopt regate precompute``)."""
        self._warned: set[str] = set()

    def is_dense(self, step: int | None = None) -> bool:
        """Does training step ``step`` (default: the next one) put every answer token in the loss?"""
        step = self.step if step is None else step
        config = self.config
        return step < config.warmup_steps or (step - config.warmup_steps) % config.cycle < config.dense_steps

    def keep_now(self) -> float:
        """The kept fraction of the next training step: 1.0 when dense, else ``keep``."""
        return 1.0 if self.is_dense() else self.config.keep

    def ema_of(self, sample: int, count: int) -> Tensor:
        """[count] EMA of ``sample``'s answer tokens (NaN where never seen)."""
        known = self.ema.get(sample)
        if known is None:
            return torch.full((count,), float("nan"))
        if known.numel() != count:
            raise InputError(
                f"sample id {sample} had {known.numel()} answer tokens when ReGATE last saw it and has {count} now; "
                "sample_ids must name the same sample (same labels) every time"
            )
        return known

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"ReGATE: {message}", stacklevel=4)

    def state_dict(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "step": self.step, "ema": dict(self.ema)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        ours = dataclasses.asdict(self.config)
        theirs = saved.get("config") if isinstance(saved, dict) else None
        if theirs != ours:
            changed = sorted(k for k in ours if not isinstance(theirs, dict) or theirs.get(k) != ours[k])
            raise InputError(
                f"this ReGATE state was saved under another configuration (differs in {', '.join(changed)}: saved "
                f"{theirs}, this model {ours}); compile with the saved configuration to resume, or start a fresh state"
            )
        self.step = int(saved["step"])
        self.ema = {int(k): v.detach().float().cpu().clone() for k, v in saved["ema"].items()}
