"""One training step: a batch encoded with its extra turns, every loss of the run on it (answer,
auxiliary probes, guides), the optimiser step, and the running means the log prints."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.train.config import TrainConfig
from models.train.heads import AuxHeads
from models.train.hooks import Taps
from models.train.lm_guide import attribute_words, guide_loss, guided_middle_layers, lm_attention_rows
from models.train.targets import (
    aux_targets,
    neighbour_targets,
    object_cells,
    presence_targets,
    relation_targets,
    token_cell,
    training_turns,
)
from models.train.tower_guide import neighbour_guide_loss, qwen_windows, tower_guide_loss
from vlmopt.reference import processing, tasks


BACKGROUND_DROP_MAX = 0.9
"""Largest per-picture drop probability of :attr:`TrainConfig.background_dropout`."""


def drop_background(attention_mask: torch.Tensor, input_ids: torch.Tensor, samples: list[tasks.Sample], visual_id: int, cell: int, share: float) -> torch.Tensor:
    """``attention_mask`` [B, L] with some background visual tokens set to 0 (see
    :attr:`TrainConfig.background_dropout`): a picture is chosen with probability ``share``, then
    each of its visual tokens that no object covers (``object_cells``) is dropped with probability
    U[0, BACKGROUND_DROP_MAX); seeded by each sample's index, so a run stays reproducible."""
    mask = attention_mask.clone()
    for row, sample in enumerate(samples):
        rng = np.random.default_rng([1, sample.index])
        if rng.random() >= share:
            continue
        visual = np.flatnonzero(input_ids[row].numpy() == visual_id)
        cells = object_cells(sample, list(range(len(sample.objects[0]))), cell)
        background = np.setdiff1d(np.arange(len(visual)), np.concatenate(cells) if cells else [])
        drop = background[rng.random(len(background)) < rng.uniform(0, BACKGROUND_DROP_MAX)]
        mask[row, visual[drop]] = 0
    return mask


def qwen_image_positions(model, batch: dict) -> torch.Tensor:
    """[3, B, L] the M-RoPE positions Qwen2.5-VL computes for an image batch from its attention mask
    (HF's own :meth:`compute_3d_position_ids`), to pass explicitly once the mask has holes."""
    return model.model.compute_3d_position_ids(
        input_ids=batch["input_ids"], image_grid_thw=batch["image_grid_thw"], video_grid_thw=None, inputs_embeds=None,
        attention_mask=batch["attention_mask"], cache=None, mm_token_type_ids=batch["mm_token_type_ids"],
    )


def _optimizer(params: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
    )


def encode_training_batch(model, processor, batch_samples, cfg: TrainConfig, qwen: bool, cell: int) -> tuple[dict, list]:
    """(model inputs with answers labelled, evidence per turn) of one batch: each sample with its extra
    turns (:func:`training_turns`), explicit positions, and ``background_dropout``'s masked background."""
    video = batch_samples[0].is_video
    turns, evidence = training_turns(
        batch_samples, cfg.extra_turns, cell, balanced=cfg.balanced_turns, weights=cfg.turn_weight_map
    )
    batch = processing.encode(processor, batch_samples, answers=True, turns=turns)
    if not qwen:  # positions count real tokens only, as generate() makes them with left padding
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    if cfg.background_dropout > 0 and not video:  # after the positions: dropped tokens keep theirs
        if qwen:  # M-RoPE positions come from the attention mask: compute them on the full one first
            batch["position_ids"] = qwen_image_positions(model, batch)
        batch["attention_mask"] = drop_background(
            batch["attention_mask"], batch["input_ids"], batch_samples, model.config.image_token_id, cell, cfg.background_dropout
        )
    return batch, evidence


def forward_loss(
    model, processor, batch_samples, aux: AuxHeads | None, taps: Taps, cfg: TrainConfig, qwen: bool, position_aids: bool = True
):
    """(total loss, answer loss, aux loss, guide loss, tower-guide loss, each aux term by name as a float)
    of one batch; ``position_aids=False`` leaves out the coordinate and relation probes and the split
    guide (``TrainConfig.position_aids_from``)."""
    video = batch_samples[0].is_video
    cell = token_cell(model)
    batch, evidence = encode_training_batch(model, processor, batch_samples, cfg, qwen, cell)
    out = model(**batch)
    lm = out.loss
    total = lm
    zero = torch.zeros(())
    g = t = zero
    reported: dict[str, float] = {}  # guide terms logged with the aux terms, not summed into the aux loss
    if taps.lm is not None and (cfg.guide_videos or not video):
        rows = lambda layer, r, p: lm_attention_rows(taps.lm, layer, batch["attention_mask"], r, p)
        visual_id = model.config.video_token_id if video else model.config.image_token_id
        g = guide_loss(
            rows, len(taps.lm.modules), batch, evidence, batch_samples, visual_id,
            cell=cell, words=attribute_words(processor.tokenizer), sink_families=cfg.guide_sink_families,
            split_families=cfg.guide_split_families if position_aids else (), read_question=cfg.guide_read_question,
            sink_ratio=cfg.guide_sink_ratio, split_question=cfg.guide_split_question, words_twice=cfg.guide_words_twice,
        )
        total = total + cfg.guide_weight * g
    tower_guides = not video and (taps.tower is not None or taps.relations is not None)
    window = qwen_windows(model, batch["image_grid_thw"]) if qwen and tower_guides else None  # both tower guides read it
    if taps.tower is not None and not video:
        t = tower_guide_loss(taps.tower, batch_samples, cell, cfg.tower_guide_share, window)
        total = total + cfg.tower_guide_weight * t
    if taps.relations is not None and not video and position_aids:
        hidden, rotary = taps.relations.inputs[0]
        n = neighbour_guide_loss(taps.relations.modules[0], hidden, rotary, batch_samples, cell, window["window_index"], window["merge_unit"])
        total = total + cfg.neighbour_guide_weight * n
        reported["neighbour-guide"] = float(n.detach())
    if aux is None:
        return total, lm.detach(), zero, g.detach(), t.detach(), reported
    terms = aux_terms(model, batch, batch_samples, evidence, aux, taps, cfg, qwen, position_aids)
    a = sum(terms.values())
    return total + cfg.aux_weight * a, lm.detach(), a.detach(), g.detach(), t.detach(), {**{k: float(v.detach()) for k, v in terms.items()}, **reported}


def aux_terms(
    model, batch: dict, batch_samples, evidence, aux: AuxHeads, taps: Taps, cfg: TrainConfig, qwen: bool, position_aids: bool
) -> dict[str, torch.Tensor]:
    """Each auxiliary probe's loss on one batch the model has just run (:meth:`AuxHeads.terms`, plus
    the relation probe on relative-position answers)."""
    video = batch_samples[0].is_video
    cell = token_cell(model)
    vision = taps.vision
    cls, presence = (None, None) if qwen else (vision.pooler_output, presence_targets(batch_samples))
    coord_tokens = None
    if position_aids and cfg.coord_aux_from == "projector":
        coord_tokens = taps.projector.output.flatten(0, 1)
    elif position_aids and cfg.coord_aux_from == "lm":
        visual_id = model.config.video_token_id if video else model.config.image_token_id
        coord_tokens = taps.lm.inputs[1][0][batch["input_ids"] == visual_id]
    neighbours = neighbour_targets(batch_samples, cell) if aux.neighbours is not None and position_aids and not video else None
    terms = aux.terms(
        vision.visual_tokens(model, qwen), aux_targets(batch_samples, cell=cell), cls, presence, coord_tokens, position_aids, neighbours
    )
    if aux.relation is not None and position_aids and not video:
        grid_w = batch_samples[0].masks.shape[2] // cell
        rows, positions, where = relation_targets(batch["labels"], evidence, grid_w)
        if rows:
            layers = len(taps.lm.modules)
            read_layer = min(guided_middle_layers(layers)[-1] + 1, layers - 1)  # reads the last guided layer's output
            hidden = taps.lm.inputs[read_layer][0][torch.tensor(rows), torch.tensor(positions)]
            terms["relation"] = 4.0 * nn.functional.mse_loss(aux.relation(hidden), where)
    return terms


@dataclass
class Run:
    """What one training run updates besides the model: the auxiliary heads (None when off), the
    hooks the losses read, every trained parameter and the optimiser."""

    cfg: TrainConfig
    aux: AuxHeads | None
    taps: Taps
    params: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer

    @classmethod
    def start(cls, model, cfg: TrainConfig) -> Run:
        aux = AuxHeads.for_model(model, cfg, cfg.qwen) if cfg.aux_weight > 0 else None
        taps = Taps.attach(model, cfg, cfg.qwen)
        params = list(model.named_parameters()) + ([("aux." + n, p) for n, p in aux.named_parameters()] if aux else [])
        return cls(cfg, aux, taps, params, _optimizer(params, cfg))

    def step(self, model, processor, batch_samples, step: int) -> tuple[torch.Tensor, ...]:
        """Optimiser step number ``step`` on ``batch_samples``; (answer, aux, guide, tower-guide) losses, detached,
        and the aux loss's terms by name."""
        aids = step >= self.cfg.position_aids_from
        loss, *parts = forward_loss(model, processor, batch_samples, self.aux, self.taps, self.cfg, self.cfg.qwen, aids)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in self.params], 1.0)
        self.optimizer.step()
        return tuple(parts)


class LossWindow:
    """Mean losses over the steps since the last log line (each aux term over the steps that had it)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.steps, self.began = 0, time.time()

    def add(self, answer, aux, guide, tower, aux_terms: dict[str, float]) -> None:
        for name, value in {"answer-loss": answer, "aux": aux, "guide": guide, "tower": tower}.items():
            self.sums[name] += float(value)
        for name, value in aux_terms.items():
            self.sums["aux " + name] += value
            self.counts["aux " + name] += 1
        self.steps += 1

    def mean(self, name: str) -> float:
        """Mean of loss ``name`` (``answer-loss``, ``aux``, ``guide``, ``tower`` or ``aux <term>``)."""
        return self.sums[name] / (self.counts[name] if name in self.counts else max(self.steps, 1))

    def report(self, minutes: float) -> str:
        """``answer-loss A aux X (colour c, ...) guide G tower T (S s/step, M min)``; ``minutes`` since the run began."""
        terms = ", ".join(f"{name[4:]} {self.mean(name):.3f}" for name in self.counts)
        return (
            f"answer-loss {self.mean('answer-loss'):.3f} aux {self.mean('aux'):.3f}{f' ({terms})' if terms else ''} "
            f"guide {self.mean('guide'):.3f} tower {self.mean('tower'):.3f} ({(time.time() - self.began) / max(self.steps, 1):.2f} s/step, {minutes:.1f} min)"
        )
