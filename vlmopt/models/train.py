"""Train a reference model from scratch on the synthetic tasks and write its directory.

    python -m vlmopt.models.train --model tiny-llava
    python -m vlmopt.models.train --model tiny-qwen25vl

Training data is rendered on the fly from the ``train`` split (sample ``i`` of step ``s`` is train
index ``s * batch + i``), so a run is reproducible from its seed. The language-model loss covers the
answer tokens only (one word + end token). Auxiliary losses speed the from-scratch vision tower up
(``--aux-weight 0`` turns them off); their heads are discarded, the saved model is the plain HF one:

* per visual token (LLaVA: CLIP patch features at the selected layer; Qwen: merged tokens): the
  colour and the shape of the object covering it (or "none"), and whether an object's centre is in it;
  optionally its grid coordinates (``--coord-aux``) and how many objects share its colour and its
  shape (``--count-aux``);
* LLaVA only: which colours / shapes are in the image, from CLIP's pooled CLS output.

Two training-only attention losses shape where the model looks (see :class:`TrainConfig`): the LM
attention guide (question words and answer positions look at the objects concerned) and the tower
attention guide (the received attention HiPrune scores with falls on objects at the
layers it reads). Both read attention weights without eager attention: the model runs SDPA and the
guides recompute the rows they need from the layers' own Q/K projections (:class:`AttentionTap`).

At the end the script evaluates on the test split (images, text-only control, videos), and writes
``config.json``, ``generation_config.json``, ``model.safetensors``, tokenizer/processor files,
``tasks.json`` (task configs), ``eval.json`` (all numbers) and ``README.md`` (the model card).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlmopt.models import arch as archs
from vlmopt.models import processing, scenes, tasks, videos
from vlmopt.models.render import COLOURS, SHAPES
from vlmopt.models.scenes import ShapesConfig
from vlmopt.models.videos import VideoConfig


@dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    model: str
    """``tiny-llava`` or ``tiny-qwen25vl``."""
    steps: int
    """Optimiser steps."""
    batch_size: int
    """Image samples per image step."""
    video_batch_size: int = 0
    """Video samples per video step."""
    video_every: int = 0
    """Every ``video_every``-th step (from ``video_from``) is a video step; 0: images only."""
    video_from: int = 0
    """First step that may be a video step (images only before: the vision tower learns first)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    warmup: int = 100
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.05
    """Cosine decay floor, as a fraction of ``lr``."""
    weight_decay: float = 0.05
    """AdamW weight decay (matrices only)."""
    aux_weight: float = 0.5
    """Weight of the auxiliary vision losses (0 disables them)."""
    guide_weight: float = 1.0
    """Weight of the attention guide: at each answer, the LM's middle layers are asked to put their
    attention (averaged over heads) on the visual tokens of the question's evidence objects. It breaks
    the long plateau of learning where to look among hundreds of mostly-background tokens; 0 disables it."""
    guide_sink_families: tuple[str, ...] = ()
    """Families whose answer-position guide keeps a sink: each of the k objects concerned gets 1/(k+1)
    of the attention and the sequence's first token the rest, so the attention output still says how
    many objects matched (k = 0: all on the sink, the "no" of an existence question). Other families
    put all attention on their objects (-log of their mass) and a turn with no object is unguided.
    Measured worse with ``coord_aux`` on tiny-llava, both for every family (2×2-patch objects: 31% at
    step 700 against 47%) and for ``count,exist`` (3×3-patch objects: 34% at step 400 against the
    shipped recipe's), but over a full run it pays: the tiny-llava preset uses ``count,exist`` (with
    ``background_dropout=0.8`` and 1,400 steps: 98.4% on the test split, counting 95%, existence 97%;
    1,100 steps with ``background_dropout=0.5``: 91.6%, and HiPrune kept only 97.2% at 1/3)."""
    guide_sink_ratio: float = 1.0
    """Target attention of each object concerned per unit of the sink's in ``guide_sink_families``: with
    ratio r each of k objects gets r/(1 + k r) and the sink 1/(1 + k r). 1 is the 1/(k+1) split; a
    smaller r keeps the mass on the objects nearer linear in k (r = 0.25: 0.20 / 0.33 / 0.43 / 0.50 for
    k = 1..4 against 0.50 / 0.67 / 0.75 / 0.80), so neighbouring counts lie further apart."""
    guide_split_families: tuple[str, ...] = ()
    """Families whose answer-position guide splits the heads between two evidence objects: the first
    half of the heads looks at the first-named object, the second half at the other, so a
    relative-position answer gets each object's features (its place) apart, not their average."""
    guide_read_question: bool = False
    """Also guide each answer position in the first LM layer to look at its own question's colour and
    shape words, so that from the second layer on it knows what it is asked and can look for it."""
    guide_split_question: bool = False
    """With ``guide_read_question``, an answer of a ``guide_split_families`` family reads its question
    split like its objects: the first half of the heads the first-named object's words, the second
    half the other's. Its next layer's split heads then each know which object to look for; read as
    one mixture, "the red circle relative to the blue square" and its converse look the same. Measured
    on tiny-qwen25vl (stage 2 + 1,000 steps with the position aids): position 35% on the test split,
    against 25% (chance) without it."""
    guide_words_twice: bool = False
    """Each colour or shape word of a question looks at its objects in the second LM layer too, not only
    the first. On Qwen the objects' places exist from the second layer's input on (its tower has no
    absolute positions; ``coord_aux_from='lm'``), so only there can a word pick up where its object
    is; tiny-llava's words get them in the first layer, from CLIP's position embedding. Measured (600
    more steps from the split-question run): the shape words then carry their objects' places (R²
    0.37-0.61, none without), the first-named object's place reaches the answer (0.42 / 0.28 against
    0.10 / 0.14) and position rose to 42.5% (n = 200) against 37% after 800 steps without it."""
    guide_videos: bool = False
    """Guide video turns too: each answer position looks at the visual tokens of its evidence tracks
    (in every frame they are on screen; the last temporal patch for "now" questions). The
    tiny-qwen25vl preset with it (and counting sink targets, 1,400 steps) answers 81.1% of the video
    questions against 48.0% without (1,200 steps): the first object seen 97–99% against 18–19%,
    needle 88.0% against 61.0%; validation at step 1,200 was already 70% / 88% (shapes-video /
    needle) against 33% / 62%."""
    tower_guide_weight: float = 0.0
    """Weight of the vision-tower attention guide: at the tower's object and deep layers (the
    layers HiPrune reads by default) the attention each token receives, averaged over heads and
    queries, is asked to fall on object tokens (see ``tower_guide_share``). HiPrune builds on the
    object-centric attention of pretrained CLIP towers, which a small tower trained from scratch on
    these tasks does not develop by itself. 0 disables it."""
    tower_guide_share: float = 1.0
    """Share of the received attention that the tower guide asks object tokens to get: its loss is
    ``max(0, log(share goal) - log(share))``, silent once the goal is met (1.0: all of it)."""
    coord_aux: bool = False
    """Auxiliary probe: each visual token's grid row and column (regressed), so where a token is can be
    read from its features, not only from the LM's rotary positions (relative-position questions)."""
    coord_aux_from: str = "tower"
    """Where that probe reads each visual token: ``tower`` (LLaVA: the CLIP features the projector
    reads; Qwen: the merged tokens), ``projector`` (LLaVA: the projector's output, the tokens the LM
    receives) or ``lm`` (the input of the LM's second layer: on Qwen, whose tower has rotary positions
    only, one LM layer with M-RoPE is the first place a token can learn where it is). Measured on the
    stop-11 tiny-llava: the coordinates are linear in the CLIP features (R² 0.96) but mostly gone after
    the projector (0.39 column, 0.52 row), and relative-position answers stayed at chance."""
    relation_aux: bool = False
    """Auxiliary probe at the answer position of each relative-position turn: from the LM's residual
    stream after its last guided layer (normalised, as the next layer reads it), regress the grid
    column and row of both named objects (first-named, then the other). It asks the split heads to
    carry each object's place into the answer, which the answer loss alone did not teach: on a
    tiny-llava whose LM inputs carry the coordinates (R² 0.96) and whose split heads put 89–97% of
    their attention on their object, the answer was linearly decodable there at 44% (majority 19%)
    and the model answered at chance."""
    position_aids_from: int = 0
    """First step at which the position aids act (``coord_aux``, ``relation_aux``, ``neighbour_aux``, the
    split guide of ``guide_split_families``); before it their probes are idle and those families are guided like the
    others. On from step 0 they cost tiny-qwen25vl most of its other families' accuracy (42–51% on
    images against 76.8%), so a run may switch them on once those are learnt. 0: from the start."""
    count_aux: bool = False
    """Auxiliary probe: on each object token, how many objects of the picture share its colour and how
    many share its shape (1, 2, 3, 4+). The tower then writes the count into every matching object's
    tokens, so a counting question becomes the same lookup as a colour question (the answer position
    reads the named objects); without it the LM must count from attention mass, which it does not learn."""
    neighbour_aux: bool = False
    """Auxiliary probe on each object token of a picture: which colours and which shapes lie left of,
    right of, above and below its object (the generator's own :func:`scenes.relation`), 4 × 12
    yes/no, so that a relative-position answer could be a lookup on the named objects, with only the
    relative offsets Qwen's 2-D rotary tower has. Measured on tiny-qwen25vl (stage 2 + 375 steps): the
    probe stayed at the prior's loss (3.9-4.1 against 3.95), so the tower did not learn it."""
    neighbour_guide_weight: float = 0.0
    """Weight of a relation guide in the vision tower (Qwen2.5-VL): in its last full-attention block,
    head ``h`` of every patch of an object is asked to look at the objects lying in direction
    ``scenes.DIRECTIONS[h % 4]`` of it, or at its own object where none does: unguided, the tower
    learnt neither ``neighbour_aux`` nor ``count_aux``, both of which need attention from one object
    to others far away. Measured (stage 2 + 325 steps with weight 1): the guide was met (its loss fell
    from 0.82 to 0.17) but the neighbour probe still read nothing (4.0). 0 disables it."""
    balanced_turns: bool = False
    """Draw each extra turn's answer uniformly among the answers its family can give on that picture,
    instead of a question uniformly: derived counting turns are otherwise mostly "one" and existence
    turns mostly "yes", and the model learns the prior."""
    background_dropout: float = 0.0
    """Share of training pictures in which part of the background is hidden from the LM: each
    visual token no object covers is masked out of attention with a probability drawn per picture
    from U[0, 0.9) (positions kept, as the pruning passes keep them). Measured on stop-12's
    tiny-llava: its last, unguided LM layer put 59–72% of an existence answer's attention on
    background tokens, and HiPrune at 1/3, which keeps every object token, cost 18 points of
    existence. With it the answers rest on the objects whatever background is left; pruners that
    drop object tokens still lose. 0 disables it. It does not help tiny-qwen25vl count: 1,100 steps
    from the shipped model with the position aids answered count 65% (0.8) and 68% (0.5) against
    the shipped 68% (test split, n = 500)."""
    extra_turns: int = 5
    """More (question, answer) turns per picture, derived from its scene (answers are labelled too):
    several answers per image forward, which speeds learning up a lot. Evaluation is single-turn."""
    curriculum: tuple[tuple[int, int, int], ...] = ((0, 1, 2), (150, 2, 4), (400, 4, 6))
    """(first step, least objects, most objects) of each image phase: one or two objects first, so
    the LM learns to read the visual tokens before it must pick the right ones among many. The last
    phase is the test distribution."""
    eval_every: int = 250
    """Validation every this many steps (greedy accuracy on ``eval_n`` samples per task)."""
    eval_n: int = 64
    """Validation samples per task."""
    test_n: int = 500
    """Test samples per task for the final numbers."""
    seed: int = 0
    """Seed of the weight initialisation."""
    rope_theta: float = archs.QwenArch.text_rope_theta
    """LM rotary base of tiny-qwen25vl (``QwenArch.text_rope_theta``); tiny-llava keeps Llama's 10,000."""
    mrope_interleaved: bool = archs.QwenArch.text_mrope_interleaved
    """tiny-qwen25vl's LM deals its rotary pairs to the three M-RoPE axes in turn (``QwenArch.text_mrope_interleaved``).
    The shipped model is the preset fine-tuned for 1,000 steps with it: images 76.8% → 78.4%, ``shapes-video``
    74.2% → 83.0%, ``needle`` 88.0% → 87.6%; relative position stayed at chance (26% → 25%). From random
    weights with the preset it was behind the preset's own run at step 1,200 (validation: images 75.0%,
    ``needle`` 60.9%), so it is a stage-2 switch, not the preset's default."""
    lm_layers: int = archs.QwenArch.text_layers
    """LM decoder layers of tiny-qwen25vl (``QwenArch.text_layers``). With ``init_from`` a shallower model, its
    layers start the run and the extra ones are appended as identities (their output projections zeroed)."""
    init_from: str = ""
    """Model directory whose weights start the run (fine-tuning: the same model, e.g. ``models/tiny-qwen25vl``,
    with new aids or a shorter schedule, or a deeper LM: ``lm_layers``); the auxiliary heads and the optimiser start fresh. Empty: a fresh
    initialisation from ``seed``."""
    threads: int = 2
    """Most threads (``torch.set_num_threads``; 1 while other processes busy a core)."""

    @property
    def qwen(self) -> bool:
        """Whether the run trains the Qwen2.5-VL reference model (M-RoPE, merged tokens, videos)."""
        return self.model == "tiny-qwen25vl"

    def __post_init__(self) -> None:
        if self.model not in ("tiny-llava", "tiny-qwen25vl"):
            raise ValueError(f"TrainConfig.model={self.model!r}: expected tiny-llava or tiny-qwen25vl")
        for name in ("steps", "batch_size", "eval_every", "eval_n", "test_n", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be at least 1")
        for name in ("lr", "aux_weight", "guide_weight", "tower_guide_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 0")
        if self.qwen:
            archs.QwenArch(text_rope_theta=self.rope_theta)  # its check of the base
        elif self.rope_theta != archs.QwenArch.text_rope_theta or self.mrope_interleaved:
            raise ValueError("TrainConfig.rope_theta and mrope_interleaved set tiny-qwen25vl's M-RoPE; tiny-llava keeps Llama's rotary")
        if self.lm_layers < 2:
            raise ValueError(f"TrainConfig.lm_layers={self.lm_layers} must be at least 2 (the guides read a first and a middle layer)")
        if not self.qwen and self.lm_layers != archs.QwenArch.text_layers:
            raise ValueError("TrainConfig.lm_layers sets tiny-qwen25vl's LM depth; tiny-llava keeps its own")
        if not 0 < self.guide_sink_ratio <= 100:
            raise ValueError(f"TrainConfig.guide_sink_ratio={self.guide_sink_ratio} must be in (0, 100] (object attention per unit of the sink's)")
        if not 0 <= self.background_dropout <= 1:
            raise ValueError(f"TrainConfig.background_dropout={self.background_dropout} must be in [0, 1]")
        if self.position_aids_from < 0:
            raise ValueError(f"TrainConfig.position_aids_from={self.position_aids_from} must be >= 0")
        if self.neighbour_aux and self.aux_weight <= 0:
            raise ValueError("TrainConfig.neighbour_aux needs aux_weight > 0 (it is one of the auxiliary probes)")
        if self.neighbour_guide_weight < 0:
            raise ValueError(f"TrainConfig.neighbour_guide_weight={self.neighbour_guide_weight} must be >= 0")
        if self.neighbour_guide_weight > 0 and self.model != "tiny-qwen25vl":
            raise ValueError("TrainConfig.neighbour_guide_weight is for tiny-qwen25vl (a tower with windows and a few full-attention blocks)")
        if self.position_aids_from > 0 and not (self.coord_aux or self.relation_aux or self.guide_split_families or self.neighbour_aux):
            raise ValueError(
                "TrainConfig.position_aids_from needs a position aid to switch on (coord_aux, relation_aux, neighbour_aux or guide_split_families)"
            )
        if self.init_from and not (Path(self.init_from) / "config.json").exists():
            raise ValueError(f"TrainConfig.init_from={self.init_from!r} is not a model directory (no config.json); pass e.g. models/{self.model}")
        if self.relation_aux and (self.guide_weight <= 0 or self.aux_weight <= 0):
            raise ValueError("TrainConfig.relation_aux needs guide_weight > 0 and aux_weight > 0 (it reads the guide's LM taps)")
        if self.coord_aux_from not in ("tower", "projector", "lm"):
            raise ValueError(f"TrainConfig.coord_aux_from={self.coord_aux_from!r}: expected tower, projector or lm")
        if self.coord_aux_from != "tower" and not self.coord_aux:
            raise ValueError("TrainConfig.coord_aux_from needs coord_aux=True (it moves that probe)")
        if self.coord_aux_from == "projector" and self.model != "tiny-llava":
            raise ValueError("TrainConfig.coord_aux_from='projector' is LLaVA's; Qwen's merged tokens are its projector output ('tower')")
        if self.coord_aux_from == "lm" and self.guide_weight <= 0:
            raise ValueError("TrainConfig.coord_aux_from='lm' needs guide_weight > 0 (it reads the guide's LM taps)")
        if not 0 < self.tower_guide_share <= 1:
            raise ValueError(f"TrainConfig.tower_guide_share={self.tower_guide_share} must be in (0, 1]")
        known = set(scenes.IMAGE_FAMILIES) | set(videos.STREAM_FAMILIES) | set(videos.NEEDLE_FAMILIES)
        for name in ("guide_sink_families", "guide_split_families"):
            unknown = sorted(set(getattr(self, name)) - known)
            if unknown:
                raise ValueError(f"TrainConfig.{name}: unknown families {unknown}; known: {sorted(known)}")
        if self.guide_split_question and not (self.guide_read_question and self.guide_split_families):
            raise ValueError("TrainConfig.guide_split_question needs guide_read_question and guide_split_families (it splits the first into the second's halves)")
        both = sorted(set(self.guide_sink_families) & set(self.guide_split_families))
        if both:
            raise ValueError(f"TrainConfig: families {both} are in both guide_sink_families and guide_split_families; pick one")


PRESETS = {
    "tiny-llava": TrainConfig(
        model="tiny-llava", steps=1400, batch_size=16, extra_turns=8, curriculum=((0, 4, 6),), eval_every=100,
        tower_guide_weight=0.5, tower_guide_share=0.5, coord_aux=True, coord_aux_from="projector", relation_aux=True,
        count_aux=True, balanced_turns=True, background_dropout=0.8, guide_sink_families=("count", "exist"),
        guide_split_families=("position",), guide_read_question=True,
    ),
    "tiny-qwen25vl": TrainConfig(
        model="tiny-qwen25vl", steps=1400, batch_size=8, video_batch_size=4, video_every=2, video_from=500, extra_turns=8,
        curriculum=((0, 4, 6),), eval_every=200, tower_guide_weight=0.5, tower_guide_share=0.5, count_aux=True,
        balanced_turns=True, guide_read_question=True, guide_videos=True, guide_sink_families=("count",),
    ),
}

TASK_CONFIGS = {
    "tiny-llava": {"shapes": ShapesConfig(size=224, radius=(0.08, 0.09375), grid=14, grid_offset=7)},
    "tiny-qwen25vl": {
        "shapes": ShapesConfig(size=448, grid=28),
        "shapes-video": VideoConfig(),
        "needle": tasks.NeedleTask.default_config(),
    },
}
"""Task configs each model is trained and evaluated with (written to ``tasks.json``)."""


def build_model(
    name: str, seed: int, rope_theta: float = archs.QwenArch.text_rope_theta, mrope_interleaved: bool = False,
    lm_layers: int = archs.QwenArch.text_layers,
):
    """(model, processor, arch) of a freshly initialised reference model (``rope_theta``, ``mrope_interleaved``,
    ``lm_layers``: Qwen's LM rotary base, M-RoPE layout and depth)."""
    from transformers import (
        LlavaForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    if name == "tiny-llava":
        arch = archs.LlavaArch()
        processor = processing.build_processor("llava", arch.image_size)
        model = LlavaForConditionalGeneration(archs.llava_config(arch, processor.tokenizer))
    elif name == "tiny-qwen25vl":
        arch = archs.QwenArch(text_rope_theta=rope_theta, text_mrope_interleaved=mrope_interleaved, text_layers=lm_layers)
        processor = processing.build_processor("qwen", arch.image_size, arch.video_size)
        model = Qwen2_5_VLForConditionalGeneration(archs.qwen_config(arch, processor.tokenizer))
    else:
        raise KeyError(f"unknown model {name!r}; expected one of {sorted(PRESETS)}")
    eos = processor.tokenizer.eos_token_id
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 3
    return model, processor, arch


# ---------------------------------------------------------------- auxiliary vision losses


COORD_SCALE = 1000
"""Grid coordinates are stored in the integer target rows as ``round(COORD_SCALE * index / (side - 1))``."""


COUNT_CLASSES = 5
"""Same-colour / same-shape count classes of :func:`cell_targets`: 0 no object, 1, 2, 3, 4 or more."""


def _token_owner(mask: np.ndarray, objects: int, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """([gh, gw] index of the object covering most of each ``cell`` px cell of ``mask`` [H, W], [gh, gw]
    whether that object covers at least 20% of it) for labels 1..``objects`` (at least one object)."""
    gh, gw = mask.shape[0] // cell, mask.shape[1] // cell
    cells = mask[: gh * cell, : gw * cell].reshape(gh, cell, gw, cell)
    cover = np.stack([(cells == k + 1).mean(axis=(1, 3)) for k in range(objects)])  # [K, gh, gw]
    return cover.argmax(0), cover.max(0) >= 0.2


def cell_targets(sample: tasks.Sample, frame: int, cell: int) -> np.ndarray:
    """[7, gh, gw] int64 per ``cell`` px cell: colour (0 none, 1..6), shape (0 none, 1..6), centre (0/1),
    column and row (0..COORD_SCALE), and how many objects of the frame share the colour, and the shape,
    of the object covering the cell (0 none, else 1..4, 4 meaning 4 or more)."""
    mask = sample.masks[frame]
    objs = sample.objects[frame]
    gh, gw = mask.shape[0] // cell, mask.shape[1] // cell
    out = np.zeros((7, gh, gw), np.int64)
    out[3] = np.round(COORD_SCALE * np.arange(gw) / max(gw - 1, 1))[None, :]
    out[4] = np.round(COORD_SCALE * np.arange(gh) / max(gh - 1, 1))[:, None]
    if not objs:
        return out
    best, hit = _token_owner(mask, len(objs), cell)
    colour = np.array([COLOURS.index(o.colour) + 1 for o in objs])
    shape = np.array([SHAPES.index(o.shape) + 1 for o in objs])
    out[0][hit], out[1][hit] = colour[best][hit], shape[best][hit]
    same_colour = np.minimum((colour[:, None] == colour[None]).sum(1), COUNT_CLASSES - 1)
    same_shape = np.minimum((shape[:, None] == shape[None]).sum(1), COUNT_CLASSES - 1)
    out[5][hit], out[6][hit] = same_colour[best][hit], same_shape[best][hit]
    for o in objs:
        y, x = min(int(o.cy // cell), gh - 1), min(int(o.cx // cell), gw - 1)
        out[2, y, x] = 1
    return out


def aux_targets(samples: list[tasks.Sample], cell: int) -> torch.Tensor:
    """[N, 7] targets (see :func:`cell_targets`), one row per visual token in the model's order (videos:
    per frame pair, the later frame's object labels where it has an object, else the earlier frame's)."""
    rows = []
    for s in samples:
        if not s.is_video:
            rows.append(cell_targets(s, 0, cell).reshape(7, -1).T)
            continue
        T = len(s.objects)
        for t in range(0, T, 2):
            early = cell_targets(s, t, cell)
            late = cell_targets(s, min(t + 1, T - 1), cell)
            merged = np.where(late[0] > 0, late, early)  # object labels (rows 0, 1, 5, 6) from one frame
            merged[2] = np.maximum(early[2], late[2])
            merged[3:5] = early[3:5]
            rows.append(merged.reshape(7, -1).T)
    return torch.from_numpy(np.concatenate(rows))


NEIGHBOUR_ATTRIBUTES = len(COLOURS) + len(SHAPES)
"""Per direction, one yes/no per colour and per shape in :func:`neighbour_targets`."""


def neighbour_targets(samples: list[tasks.Sample], cell: int) -> torch.Tensor:
    """[N, 4 × 12] float, one row per visual token of still pictures (raster order): for the object
    covering the token (as :func:`cell_targets` assigns it), block ``d`` of :data:`scenes.DIRECTIONS`
    marks the colours (first 6) and shapes (last 6) of the objects that are ``d`` of it by
    :func:`scenes.relation`; rows of background tokens are all 0 (the probe skips them)."""
    rows = []
    for s in samples:
        if s.is_video:
            raise ValueError("neighbour_targets: still pictures only")
        objs, mask = s.objects[0], s.masks[0]
        gh, gw = mask.shape[0] // cell, mask.shape[1] // cell
        per_object = np.zeros((len(objs), len(scenes.DIRECTIONS), NEIGHBOUR_ATTRIBUTES), np.float32)
        for k, o in enumerate(objs):
            for other in objs:
                where = scenes.relation(other, o) if other is not o else None
                if where is not None:
                    d = scenes.DIRECTIONS.index(where)
                    per_object[k, d, COLOURS.index(other.colour)] = 1.0
                    per_object[k, d, len(COLOURS) + SHAPES.index(other.shape)] = 1.0
        out = np.zeros((gh * gw, len(scenes.DIRECTIONS) * NEIGHBOUR_ATTRIBUTES), np.float32)
        if objs:
            best, hit = (a.reshape(-1) for a in _token_owner(mask, len(objs), cell))
            out[hit] = per_object.reshape(len(objs), -1)[best[hit]]
        rows.append(out)
    return torch.from_numpy(np.concatenate(rows))


class AuxHeads(nn.Module):
    """Linear probes trained with the model and then thrown away."""

    def __init__(
        self, token_dim: int, cls_dim: int | None, coords: bool = False, counts: bool = False,
        coord_dim: int | None = None, relation_dim: int | None = None, neighbours: bool = False,
    ) -> None:
        super().__init__()
        self.neighbours = nn.Linear(token_dim, len(scenes.DIRECTIONS) * NEIGHBOUR_ATTRIBUTES) if neighbours else None
        self.relation = nn.Linear(relation_dim, 4) if relation_dim else None
        self.colour = nn.Linear(token_dim, len(COLOURS) + 1)
        self.shape = nn.Linear(token_dim, len(SHAPES) + 1)
        self.centre = nn.Linear(token_dim, 1)
        self.presence = nn.Linear(cls_dim, len(COLOURS) + len(SHAPES)) if cls_dim else None
        self.coords = nn.Linear(coord_dim or token_dim, 2) if coords else None
        self.counts = nn.Linear(token_dim, 2 * COUNT_CLASSES) if counts else None

    @classmethod
    def for_model(cls, model, cfg: TrainConfig, qwen: bool) -> AuxHeads:
        """The probes ``cfg`` asks for, sized to where they read: Qwen's merged tokens (LM width, no
        CLS), LLaVA's CLIP features and CLS; the coordinate probe off the tower and the relation
        probe read LM-width tokens."""
        text, vision = model.config.text_config.hidden_size, model.config.vision_config.hidden_size
        token_dim, cls_dim = (text, None) if qwen else (vision, vision)
        return cls(
            token_dim, cls_dim, coords=cfg.coord_aux, counts=cfg.count_aux,
            coord_dim=text if cfg.coord_aux_from != "tower" else None,
            relation_dim=text if cfg.relation_aux else None, neighbours=cfg.neighbour_aux,
        )

    def terms(
        self, tokens: torch.Tensor, targets: torch.Tensor, cls: torch.Tensor | None, presence: torch.Tensor | None,
        coord_tokens: torch.Tensor | None = None, coords: bool = True, neighbours: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each probe's loss term, by name (their sum is the aux loss). ``tokens`` [N, D] visual tokens,
        ``targets`` [N, 7]; ``cls`` [B, Dc], ``presence`` [B, 12]; ``coord_tokens`` [N, Dp] the same
        tokens elsewhere in the model, for the coordinate probe (default: ``tokens``); ``coords=False``
        leaves that probe out (position aids not on yet). A coordinate probe that reads nothing scores
        about 4/3 (4 × the variance of a uniform place in [-1, 1]). ``neighbours`` [N, 48]
        (:func:`neighbour_targets`, pictures only) feeds the neighbour probe, on object tokens."""
        weight = 1.0 + 3.0 * (targets[:, 0] > 0).float()  # objects are a few % of the tokens
        ce = nn.functional.cross_entropy
        out = {
            "colour": (ce(self.colour(tokens), targets[:, 0], reduction="none") * weight).mean(),
            "shape": (ce(self.shape(tokens), targets[:, 1], reduction="none") * weight).mean(),
            "centre": nn.functional.binary_cross_entropy_with_logits(
                self.centre(tokens).squeeze(-1), targets[:, 2].float(), pos_weight=torch.tensor(10.0)
            ),
        }
        if self.presence is not None and cls is not None:
            out["presence"] = nn.functional.binary_cross_entropy_with_logits(self.presence(cls), presence)
        if self.coords is not None and coords:
            where = targets[:, 3:5].float() * (2.0 / COORD_SCALE) - 1.0  # column, row in [-1, 1]
            coord_from = tokens if coord_tokens is None else coord_tokens
            out["coords"] = 4.0 * nn.functional.mse_loss(self.coords(coord_from), where)
        if self.neighbours is not None and neighbours is not None:
            on_object = targets[:, 0] > 0
            if on_object.any():
                out["neighbours"] = nn.functional.binary_cross_entropy_with_logits(
                    self.neighbours(tokens[on_object]), neighbours[on_object]
                ) * float(NEIGHBOUR_ATTRIBUTES)  # per direction summed over its 12 answers: each one is rare
        if self.counts is not None:
            same_colour, same_shape = self.counts(tokens).split(COUNT_CLASSES, dim=-1)
            out["counts"] = (ce(same_colour, targets[:, 5], reduction="none") * weight).mean() + (
                ce(same_shape, targets[:, 6], reduction="none") * weight
            ).mean()
        return out


def answer_starts(labels_row: torch.Tensor) -> np.ndarray:
    """Positions of the first token of each labelled answer in one row of ``labels`` [L] (-100 off
    the answers), in turn order; the position before each predicts it."""
    labelled = labels_row.numpy() != -100
    return np.flatnonzero(labelled & ~np.concatenate([[False], labelled[:-1]]))


def guided_middle_layers(num_layers: int) -> list[int]:
    """The LM layers whose answer positions the attention guide points at the evidence: all but the
    first (it reads the question words) and the last, at least layer 1."""
    return list(range(1, max(2, num_layers - 1)))


def relation_targets(labels: torch.Tensor, evidence, grid_w: int) -> tuple[list[int], list[int], torch.Tensor]:
    """(batch rows, query positions, [R, 4] targets) of :attr:`TrainConfig.relation_aux`: for every
    relative-position turn with both objects on screen, the position that predicts its answer and
    the mean grid column and row of each object's tokens (first-named object first), in [-1, 1].
    ``labels`` [B, L] (-100 off the answers), ``evidence`` as :func:`training_turns` returns it,
    ``grid_w`` visual tokens per row."""
    rows, positions, targets = [], [], []
    scale = 2.0 / max(grid_w - 1, 1)
    for row in range(labels.shape[0]):
        for start, (family, groups) in zip(answer_starts(labels[row]), evidence[row]):
            if family != "position" or len(groups) != 2 or not all(len(g) for g in groups):
                continue
            first, other = [((g % grid_w).mean() * scale - 1.0, (g // grid_w).mean() * scale - 1.0) for g in groups]
            rows.append(row), positions.append(int(start) - 1)
            targets.append([*first, *other])
    return rows, positions, torch.tensor(targets, dtype=torch.float32).reshape(-1, 4)


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


def presence_targets(samples: list[tasks.Sample]) -> torch.Tensor:
    """[B, 12]: which colours and shapes appear in each image."""
    out = torch.zeros(len(samples), len(COLOURS) + len(SHAPES))
    for i, s in enumerate(samples):
        for o in s.objects[0]:
            out[i, COLOURS.index(o.colour)] = 1
            out[i, len(COLOURS) + SHAPES.index(o.shape)] = 1
    return out


def token_cell(model) -> int:
    """Side, in pixels, of the image square one visual token of ``model`` covers: a CLIP patch for
    LLaVA, a 2×2 merge group of patches for Qwen2.5-VL."""
    vision = model.config.vision_config
    return vision.patch_size * getattr(vision, "spatial_merge_size", 1)


class OutputTap:
    """Keeps a module's last output (a forward hook): LLaVA's projector, for the coordinate probe."""

    def __init__(self, module: nn.Module) -> None:
        self.output = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.output = output

    def remove(self) -> None:
        self.handle.remove()


class VisionTap(OutputTap):
    """Keeps the vision tower's last output (a forward hook), for the auxiliary losses."""

    def __init__(self, module: nn.Module) -> None:
        self.hidden_states = self.pooler_output = None
        super().__init__(module)

    def _hook(self, module, args, output) -> None:
        # copy now: LLaVA / Qwen overwrite ``pooler_output`` of this object afterwards
        self.hidden_states, self.pooler_output = output.hidden_states, output.pooler_output

    def visual_tokens(self, model, qwen: bool) -> torch.Tensor:
        """[N, D] the visual tokens the auxiliary probes read, in :func:`aux_targets` order: Qwen's
        merged tokens, LLaVA's CLIP patch features (no CLS) at the layer the projector reads."""
        if qwen:
            return self.pooler_output
        return self.hidden_states[model.config.vision_feature_layer][:, 1:].flatten(0, 1)


# ---------------------------------------------------------------- attention guide


def _covered_cells(mask: np.ndarray, label: int, cell: int) -> np.ndarray:
    """Flat raster indices of the ``cell`` px grid cells of ``mask`` [H, W] that ``label`` covers by
    at least 10%."""
    gh, gw = mask.shape[0] // cell, mask.shape[1] // cell
    cells = mask[: gh * cell, : gw * cell].reshape(gh, cell, gw, cell)
    return np.flatnonzero((cells == label).mean(axis=(1, 3)) >= 0.1)


def object_cells(sample: tasks.Sample, object_ids: list[int], cell: int) -> list[np.ndarray]:
    """Per object of ``object_ids``, the flat indices of the ``cell`` px grid cells (the visual tokens,
    raster order) it covers by at least 10%."""
    return [_covered_cells(sample.masks[0], k + 1, cell) for k in object_ids]


def track_tokens(sample: tasks.Sample, track_ids: list[int], cell: int, first_frame: int = 0) -> list[np.ndarray]:
    """Per track of ``track_ids``, the indices of the video's visual tokens it covers from
    ``first_frame`` on. Qwen2.5-VL's video tokens come per temporal patch (frames 2t, 2t+1), each in
    raster order of the ``cell`` px merged grid."""
    per_patch = (sample.masks.shape[1] // cell) * (sample.masks.shape[2] // cell)
    groups = []
    for track in track_ids:
        hits = [
            (t // 2) * per_patch + _covered_cells(sample.masks[t], k + 1, cell)
            for t in range(first_frame, len(sample.objects))
            for k, o in enumerate(sample.objects[t])
            if o.track == track
        ]
        groups.append(np.unique(np.concatenate(hits)) if hits else np.zeros(0, np.int64))
    return groups


def training_turns(
    samples: list[tasks.Sample], k: int, cell: int = 14, balanced: bool = False
) -> tuple[list[list[tuple[str, str]]], list[list[tuple[str, list[np.ndarray]]]]]:
    """Extra (question, answer) turns of each picture or video (the same as
    :meth:`tasks.Sample.more_questions`; ``balanced``: see :func:`scenes.derive`), and for every turn (the sample's own question first) its
    family and the visual tokens of each evidence object (``cell``: a visual token's side, pixels)."""
    turns, evidence = [], []
    for s in samples:
        rng = np.random.default_rng([0, s.index])
        if s.is_video:
            tracks, frames = s.meta["tracks"], s.meta["num_frames"]
            pairs = videos.derive(rng, tracks, frames, k, skip={s.question}) if k else []
            asked = [(s.family, sorted({s.objects[t][j].track for t, j in s.evidence}))]
            asked += [(q.family, videos.oracle(q, tracks, frames)[1]) for q, _ in pairs]
            groups = [(f, track_tokens(s, ids, cell, videos.evidence_start(f, frames))) for f, ids in asked]
        else:
            pairs = scenes.derive(rng, s.objects[0], k, skip={s.question}, balanced=balanced) if k else []
            groups = [(s.family, object_cells(s, [o for _, o in s.evidence], cell))]
            groups += [(q.family, object_cells(s, scenes.oracle(q, s.objects[0])[1], cell)) for q, _ in pairs]
        turns.append([(q.text, a) for q, a in pairs])
        evidence.append(groups)
    return turns, evidence


def attribute_words(tokenizer) -> dict[int, tuple[str, str]]:
    """Token id → (attribute, value) for every colour and shape word (plurals included)."""
    words = {c: ("colour", c) for c in COLOURS}
    for shape in SHAPES:
        words[shape] = words[shape + ("es" if shape.endswith("s") else "s")] = ("shape", shape)
    vocab = tokenizer.get_vocab()
    return {vocab[w]: attr for w, attr in words.items() if w in vocab}


class AttentionTap:
    """Keeps the inputs of some attention modules (forward pre-hooks), so their attention weights
    can be recomputed for the few query rows a guide needs while the model itself runs SDPA
    (reading weights from HF would need eager attention on every row: ~1/3 of a training step)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.inputs: dict[int, tuple] = {}
        self.handles = [
            m.register_forward_pre_hook(lambda mod, args, kwargs, i=i: self._keep(i, args, kwargs), with_kwargs=True)
            for i, m in enumerate(modules)
        ]

    def _keep(self, index: int, args, kwargs) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.inputs[index] = (hidden, kwargs.get("position_embeddings"))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def lm_attention_rows(tap: AttentionTap, layer: int, key_mask: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[R, H, L] causal attention weights (per head) of query ``positions`` of batch ``rows`` in LM
    decoder layer ``layer``, recomputed from its Q/K projections and rotary embedding exactly as the
    layer computes them (Llama and Qwen2 layouts; grouped-query heads). ``key_mask`` [B, L] is the
    batch's attention mask (1 = real token)."""
    from transformers.models.llama.modeling_llama import rotate_half  # Qwen2's is the same function

    attn = tap.modules[layer]
    hidden, (cos, sin) = tap.inputs[layer]
    B, L, _ = hidden.shape
    d = attn.head_dim
    cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)  # [1, L, d] when positions are shared
    k = attn.k_proj(hidden).view(B, L, -1, d).transpose(1, 2)  # [B, KV, L, d]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    q = attn.q_proj(hidden[rows, positions]).view(len(rows), -1, d)  # [R, H, d]
    q = q * cos[rows, positions][:, None] + rotate_half(q) * sin[rows, positions][:, None]
    kv, groups = k.shape[1], attn.num_key_value_groups
    q = q.view(len(rows), kv, groups, d)  # head h reads key head h // groups
    logits = q.new_empty(len(rows), kv, groups, L)
    for b in rows.unique().tolist():  # one product per sequence: no per-row copy of its keys
        sel = (rows == b).nonzero().squeeze(1)
        logits[sel] = torch.einsum("rkgd,kld->rkgl", q[sel], k[b])
    logits = logits.flatten(1, 2) * attn.scaling  # [R, H, L]
    allowed = key_mask[rows].bool() & (torch.arange(L)[None] <= positions[:, None])
    return torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1)


def _head_weights(which: str, heads: int) -> torch.Tensor:
    """[heads] averaging weights over all heads, or over the first or the second half of them."""
    w = torch.zeros(heads)
    if which == "all":
        w[:] = 1.0
    elif which == "first":
        w[: heads // 2] = 1.0
    else:
        w[heads // 2 :] = 1.0
    return w / w.sum()


def guide_loss(
    attention_rows, num_layers: int, batch: dict, evidence, samples, visual_token_id: int, cell: int, words: dict,
    sink_families, split_families=(), read_question: bool = False, sink_ratio: float = 1.0,
    split_question: bool = False, words_twice: bool = False,
) -> torch.Tensor:
    """Attention guide: cross-entropy between a target attention distribution over regions and the
    attention mass on them (attention averaged over heads), averaged over guided positions.

    Two kinds of positions are guided. Every colour or shape word of a question, in the first layer
    (and the second with ``words_twice``), looks at the objects with that attribute (one hop: the
    query is the word itself). The position
    that predicts each answer, in the middle layers, looks at the answer's evidence objects. For a
    family in ``sink_families`` each of the k objects is a region with target r/(1 + k r) and the first
    real token (an attention sink) takes the rest (r = ``sink_ratio``; 1: 1/(k+1) each). For a family in ``split_families`` with two
    evidence objects (relative position: the first-named object, then the other) the first half of
    the heads put all their attention on the first object and the second half on the second, so the
    two objects' features (where each is) reach the answer apart instead of averaged. Otherwise the
    objects' union is one region with target 1 and a position with no object on screen is skipped.
    With ``read_question`` the position that predicts each answer also looks, in the first layer, at
    the colour and shape words of its own question (text tokens, not visual ones); with
    ``split_question`` too, an answer of a family in ``split_families`` reads them split like its
    objects: the first half of the heads the first-named object's words, the second half the other's.
    ``attention_rows(layer, rows, positions)`` gives [R, H, L] attention weights of those query
    positions; ``evidence[row]`` lists (family, visual-token indices of each evidence object) per
    answered turn (:func:`training_turns`).
    """
    labels, ids, attention_mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    length = ids.shape[1]
    regions = {kind: ([], [], [], [], []) for kind in ("words", "first", "middle")}  # rows, positions, [L] masks, targets, head sets
    guided = {kind: 0 for kind in regions}

    def guide(kind, row, pos, parts):
        """Guide query ``pos`` of ``row``: each part is (key positions, target mass, head set)."""
        rows, positions, masks, targets, heads = regions[kind]
        for part, target, which in parts:
            mask = np.zeros(length, np.float32)
            mask[part] = 1.0
            rows.append(row), positions.append(pos), masks.append(mask), targets.append(target), heads.append(which)
        guided[kind] += 1

    def look(kind, row, pos, groups, visual_pos, sink_pos, family):
        cells = [c for c in groups if len(c)]
        if family in sink_families:
            share = 1.0 / (1.0 + len(cells) * sink_ratio)
            parts = [(visual_pos[c], sink_ratio * share, "all") for c in cells]
            parts.append((np.array([sink_pos]), share, "all"))
        elif family in split_families and len(groups) == 2 and len(cells) == 2:
            parts = [(visual_pos[cells[0]], 1.0, "first"), (visual_pos[cells[1]], 1.0, "second")]
        elif cells:
            parts = [(visual_pos[np.concatenate(cells)], 1.0, "all")]
        else:
            return
        guide(kind, row, pos, parts)

    for row, sample in enumerate(samples):
        row_ids = ids[row].numpy()
        visual_pos = np.flatnonzero(row_ids == visual_token_id)
        sink_pos = int(np.flatnonzero(attention_mask[row].numpy())[0])
        word_pos = np.flatnonzero(np.isin(row_ids, list(words)))
        if not sample.is_video:  # a word of a video question names objects in many frames: not guided
            objects = sample.objects[0]
            for pos in word_pos:
                kind, value = words[int(row_ids[pos])]
                named = object_cells(sample, [k for k, o in enumerate(objects) if getattr(o, kind) == value], cell)
                look("words", row, pos, named, visual_pos, sink_pos, None)
        starts = answer_starts(labels[row])
        previous = 0
        for start, (family, groups) in zip(starts, evidence[row]):
            look("middle", row, start - 1, groups, visual_pos, sink_pos, family)
            asked = word_pos[(word_pos > previous) & (word_pos < start)]
            if read_question and split_question and family in split_families and len(asked) >= 2:
                half = len(asked) // 2  # the first-named object's words come first in the question
                guide("first", row, start - 1, [(asked[:half], 1.0, "first"), (asked[half:], 1.0, "second")])
            elif read_question and len(asked):
                guide("first", row, start - 1, [(asked, 1.0, "all")])
            previous = start
    total, count = torch.zeros(()), 0
    layers = {"words": [0, 1] if words_twice else [0], "first": [0], "middle": guided_middle_layers(num_layers)}
    for kind, (rows, positions, masks, targets, heads) in regions.items():
        if rows:
            r, p = torch.tensor(rows), torch.tensor(positions)
            attn = torch.stack([attention_rows(layer, r, p) for layer in layers[kind]]).mean(dim=0)  # [R, H, L]
            weights = torch.stack([_head_weights(which, attn.shape[1]) for which in heads])  # [R, H]
            mass = ((attn * torch.from_numpy(np.stack(masks))[:, None]).sum(-1) * weights).sum(-1)
            total = total - (torch.tensor(targets) * torch.log(mass + 1e-6)).sum()
            count += guided[kind]
    return total / max(count, 1)


def _object_token_mask(sample: tasks.Sample, cell: int, offset: int) -> torch.Tensor:
    """[offset + tokens] 1.0 on the visual tokens (``cell`` px, raster order) an object covers; the
    first ``offset`` entries (CLS) are 0."""
    cells = object_cells(sample, list(range(len(sample.objects[0]))), cell)
    mask = torch.zeros(offset + (sample.masks.shape[1] // cell) * (sample.masks.shape[2] // cell))
    if cells:
        mask[offset + np.concatenate(cells)] = 1.0
    return mask


def _qwen_received(attn: nn.Module, hidden: torch.Tensor, rotary, grid_thw: torch.Tensor, window_index: torch.Tensor, merge_unit: int) -> list[torch.Tensor]:
    """Per image, [merged tokens] received attention of one Qwen2.5-VL vision block in raster order:
    HiPrune's score (:func:`vlmopt.graph.functions.qwen_received_attention`, with the op's
    differentiable reference). ``hidden`` [P, D] and ``rotary`` (cos, sin) are in the tower's window
    order; ``window_index`` maps merge groups to raster order."""
    from vlmopt.graph import functions as gf
    from vlmopt.graph.layout import VisualLayout
    from vlmopt.ops.received_attention import reference

    side = int(merge_unit**0.5)
    grids = tuple((t, h // side, w // side) for t, h, w in grid_thw.tolist())
    layout = VisualLayout.from_grids(len(grids), 1, tuple(range(len(grids))), grids)
    pooled = gf.qwen_received_attention(attn.qkv(hidden), *rotary, layout, attn.num_heads, attn.scaling, merge_unit, score=reference)
    raster = torch.empty_like(pooled).index_put((window_index,), pooled)
    return list(raster.split(list(layout.counts)))


def qwen_windows(model, grid_thw: torch.Tensor) -> dict:
    """What :func:`tower_guide_loss` needs to read a Qwen2.5-VL tower's window-ordered blocks."""
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
    return {"grid_thw": grid_thw, "window_index": index, "merge_unit": visual.spatial_merge_unit}


def tower_guide_loss(tap: AttentionTap, samples: list[tasks.Sample], cell: int, goal: float = 1.0, qwen: dict | None = None) -> torch.Tensor:
    """``max(0, log(goal) - log(share))`` with ``share`` the part of the received attention (HiPrune's
    score: mean over heads and all queries) that falls on object tokens, averaged over the tapped
    layers and images. CLIP: token 0 is CLS, patch tokens follow in raster order. Qwen2.5-VL (``qwen``
    = ``{"grid_thw", "window_index", "merge_unit"}`` of the batch): merged tokens, scores as
    :func:`_qwen_received` computes them (single images only)."""
    from vlmopt.ops.received_attention import reference as received_attention

    masks = [_object_token_mask(s, cell, offset=0 if qwen else 1) for s in samples]
    has_objects = torch.tensor([bool(m.sum() > 0) for m in masks])
    losses = []
    for index, attn in enumerate(tap.modules):
        hidden, rotary = tap.inputs[index]
        if qwen is None:
            received = list(received_attention(attn.q_proj(hidden), attn.k_proj(hidden), attn.num_heads, attn.scale))
        else:
            received = _qwen_received(attn, hidden, rotary, qwen["grid_thw"], qwen["window_index"], qwen["merge_unit"])
        share = torch.stack([(r * m).sum() / r.sum() for r, m in zip(received, masks)])
        losses.append(torch.relu(math.log(goal) - torch.log(share[has_objects] + 1e-6)).mean())
    return torch.stack(losses).mean()


def neighbour_guide_loss(
    attn: nn.Module, hidden: torch.Tensor, rotary, samples: list[tasks.Sample], cell: int, window_index: torch.Tensor, merge_unit: int
) -> torch.Tensor:
    """:attr:`TrainConfig.neighbour_guide_weight`'s loss: mean over object patches and heads of
    ``-log`` the attention mass head ``h`` puts on the patches of the objects ``scenes.DIRECTIONS[h % 4]``
    of its own object (on its own object where none is). ``hidden`` [P, D] is a full-attention Qwen2.5-VL
    vision block's normalised input in window order, ``rotary`` its (cos, sin); ``window_index`` [P /
    merge_unit] maps window order to the batch's merged tokens in raster order (one image per sample,
    each ``cell`` px merged token one token of :func:`object_cells`)."""
    from vlmopt.graph.functions import qwen_vision_qk

    patches, heads = hidden.shape[0], attn.num_heads
    q, k = qwen_vision_qk(attn.qkv(hidden), *rotary, heads)
    where = torch.argsort(window_index)  # raster merged token -> its place in window order
    per_image = patches // merge_unit // len(samples)
    directions = [scenes.DIRECTIONS[h % len(scenes.DIRECTIONS)] for h in range(heads)]
    losses = []
    for i, s in enumerate(samples):
        objs = s.objects[0]
        cells = object_cells(s, list(range(len(objs))), cell)
        rows = lambda tokens: (where[torch.as_tensor(tokens, dtype=torch.long) + i * per_image][:, None] * merge_unit + torch.arange(merge_unit)).reshape(-1)
        first = i * per_image * merge_unit  # windows never mix images: image i's patches are contiguous
        keys = k[first : first + per_image * merge_unit]
        for o, own in enumerate(cells):
            if not len(own):
                continue
            target = torch.zeros(heads, keys.shape[0])
            for h, direction in enumerate(directions):
                there = [c for p, c in enumerate(cells) if p != o and len(c) and scenes.relation(objs[p], objs[o]) == direction]
                target[h, rows(np.concatenate(there) if there else own) - first] = 1.0
            weights = torch.einsum("rhd,khd->rhk", q[rows(own)], keys).mul(attn.scaling).softmax(-1)  # [R, H, keys]
            losses.append(-torch.log((weights * target).sum(-1) + 1e-6).mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


# ---------------------------------------------------------------- training loop


class ThreadGovernor:
    """Uses ``max_threads`` while the machine is otherwise idle and 1 thread while other processes
    keep a core busy: two OpenMP threads sharing a core with another job run several times slower
    than one thread (each parallel region waits for the descheduled thread). Reads ``/proc``; a
    no-op where that is missing."""

    def __init__(self, max_threads: int, log) -> None:
        self.max_threads, self.log, self.threads = max_threads, log, max_threads
        torch.set_num_threads(max_threads)
        self.prev = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(busy ticks of all CPUs, all ticks of all CPUs, ticks of this process) so far."""
        try:
            cpu = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:8]]
            fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            mine = float(fields[11]) + float(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            return None
        return sum(cpu) - cpu[3] - cpu[4], sum(cpu), mine

    def update(self) -> None:
        """Re-decide from the CPU use since the last call."""
        now = self._sample()
        if now is None or self.prev is None or self.max_threads == 1:
            return
        busy, total, mine = (a - b for a, b in zip(now, self.prev))
        self.prev = now
        if total <= 0:
            return
        others = max(0.0, busy - mine) / total * (os.cpu_count() or 1)  # cores busy with other work
        want = 1 if others > 0.5 else self.max_threads
        if want != self.threads:
            torch.set_num_threads(want)
            self.log(f"other processes use {others:.1f} cores: {want} thread(s)")
            self.threads = want


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_plan(cfg: TrainConfig) -> list[str]:
    """Which task each step trains on."""
    video_tasks = ["shapes-video", "needle"]
    plan, k = [], 0
    for step in range(cfg.steps):
        if cfg.video_every and step >= cfg.video_from and (step - cfg.video_from) % cfg.video_every == cfg.video_every - 1:
            plan.append(video_tasks[k % 2])
            k += 1
        else:
            plan.append("shapes")
    return plan


def phase_task(task: tasks.Task, step: int, cfg: TrainConfig) -> tasks.Task:
    """``task`` with the object count of the curriculum phase ``step`` is in."""
    lo, hi = next(phase[1:] for phase in reversed(cfg.curriculum) if step >= phase[0])
    config = dataclasses.replace(task.config, objects=(lo, hi))
    return task if config == task.config else type(task)(config)


def _optimizer(params: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
    )


@dataclass
class Taps:
    """The hooks one training run reads: vision-tower output (aux losses), LM attention inputs
    (attention guide) and vision-block attention inputs at HiPrune's layers (tower guide); None where off."""

    vision: VisionTap | None = None
    lm: AttentionTap | None = None
    tower: AttentionTap | None = None
    projector: OutputTap | None = None
    relations: AttentionTap | None = None

    @classmethod
    def attach(cls, model, cfg: TrainConfig, qwen: bool) -> Taps:
        vision = (model.model.visual if qwen else model.model.vision_tower) if cfg.aux_weight > 0 else None
        lm_layers = model.model.language_model.layers
        tower = None
        if cfg.tower_guide_weight > 0:
            from vlmopt.adapters import adapter_for
            from vlmopt.passes.hiprune import HiPrune

            object_layer, deep_layer = HiPrune(keep_ratio=1.0).layers(adapter_for(model))
            if qwen:
                tower = AttentionTap([model.model.visual.blocks[i].attn for i in (object_layer, deep_layer)])
            else:
                tower = AttentionTap([model.model.vision_tower.encoder.layers[i].self_attn for i in (object_layer, deep_layer)])
        return cls(
            vision=VisionTap(vision) if vision is not None else None,
            lm=AttentionTap([layer.self_attn for layer in lm_layers]) if cfg.guide_weight > 0 else None,
            tower=tower,
            projector=OutputTap(model.model.multi_modal_projector) if cfg.coord_aux_from == "projector" and vision is not None else None,
            relations=(
                AttentionTap([model.model.visual.blocks[max(model.model.visual.fullatt_block_indexes)].attn])
                if qwen and cfg.neighbour_guide_weight > 0 else None
            ),
        )

    def remove(self) -> None:
        for tap in (self.vision, self.lm, self.tower, self.projector, self.relations):
            if tap is not None:
                tap.remove()


def forward_loss(
    model, processor, batch_samples, aux: AuxHeads | None, taps: Taps, cfg: TrainConfig, qwen: bool, position_aids: bool = True
):
    """(total loss, answer loss, aux loss, guide loss, tower-guide loss, each aux term by name as a float)
    of one batch; ``position_aids=False`` leaves out the coordinate and relation probes and the split
    guide (``TrainConfig.position_aids_from``)."""
    video = batch_samples[0].is_video
    cell = token_cell(model)
    turns, evidence = training_turns(batch_samples, cfg.extra_turns, cell, balanced=cfg.balanced_turns)
    batch = processing.encode(processor, batch_samples, answers=True, turns=turns)
    if not qwen:  # positions count real tokens only, as generate() makes them with left padding
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    if cfg.background_dropout > 0 and not video:  # after the positions: dropped tokens keep theirs
        if qwen:  # M-RoPE positions come from the attention mask: compute them on the full one first
            batch["position_ids"] = qwen_image_positions(model, batch)
        batch["attention_mask"] = drop_background(
            batch["attention_mask"], batch["input_ids"], batch_samples, model.config.image_token_id, cell, cfg.background_dropout
        )
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
    a = sum(terms.values())
    return total + cfg.aux_weight * a, lm.detach(), a.detach(), g.detach(), t.detach(), {**{k: float(v.detach()) for k, v in terms.items()}, **reported}


def training_batch(task, cfg: TrainConfig, start: int) -> list:
    """The ``train``-split samples ``start, start + 1, ...`` of one step on ``task``: ``cfg.batch_size``
    of them, ``cfg.video_batch_size`` for a video task."""
    size = cfg.video_batch_size if task.video else cfg.batch_size
    return [task.sample("train", start + i) for i in range(size)]


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


def start_from(model, directory: Path) -> None:
    """Copy the weights of the model saved in ``directory`` (loaded as users load it) into ``model``,
    which must be the same architecture with the same sizes, or with more LM layers: those are appended
    after the trained ones as identities (attention and MLP output projections zeroed), so the run starts
    from the trained model's exact function."""
    from vlmopt import models

    trained, _ = models.load(directory)
    own, theirs = model.state_dict(), trained.state_dict()
    appended = lm_layers_appended(model, trained)
    if appended:
        silenced = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # an appended layer adds nothing yet
        theirs = {**theirs, **{n: torch.zeros_like(w) if n.endswith(silenced) else w for n, w in own.items() if lm_layer_index(n) in appended}}
    mismatched = sorted(n for n in own.keys() & theirs.keys() if own[n].shape != theirs[n].shape)
    if type(trained) is not type(model) or own.keys() != theirs.keys() or mismatched:
        raise ValueError(
            f"{directory} holds a {type(trained).__name__} that does not fit this {type(model).__name__} "
            f"(parameters of other shapes: {mismatched[:3]}); pass a directory trained with the same --model"
        )
    own_rope = dict(getattr(model.config.get_text_config(), "rope_parameters", None) or {})
    their_rope = dict(getattr(trained.config.get_text_config(), "rope_parameters", None) or {})
    # Another M-RoPE layout is a deliberate change (text ids are equal on the three axes, so text turns
    # the same; only visual tokens move and the run re-learns them); another base turns every token.
    own_rope.pop("mrope_section", None), their_rope.pop("mrope_section", None)
    if own_rope != their_rope:  # same shapes, other positions: the weights would be read wrongly
        raise ValueError(
            f"{directory} was trained with the LM rotary parameters {their_rope}, this run builds {own_rope}; "
            f"pass --rope-theta {their_rope.get('rope_theta', '<its base>')} to fine-tune it"
        )
    model.load_state_dict(theirs)


def lm_layer_index(name: str) -> int | None:
    """The LM decoder layer a parameter name belongs to (``...language_model.layers.<i>....``); None elsewhere."""
    _, found, tail = name.partition("language_model.layers.")
    return int(tail.split(".", 1)[0]) if found else None


def lm_layers_appended(model, trained) -> set[int]:
    """Indices of ``model``'s LM layers beyond ``trained``'s (empty when it is not deeper)."""
    ours = model.config.get_text_config().num_hidden_layers
    theirs = trained.config.get_text_config().num_hidden_layers
    return set(range(theirs, ours)) if ours > theirs else set()


def recorded_commands(directory: Path) -> list[str]:
    """The commands that trained the model in ``directory`` (its ``eval.json``), first stage first: the
    ones behind its own starting weights, then its own; [] where none is recorded."""
    record = Path(directory) / "eval.json"
    if not record.exists():
        return []
    results = json.loads(record.read_text())
    own = results.get("train_command", "")
    return [*results.get("init_from_commands", []), own] if own else []


def train(cfg: TrainConfig, out_dir: Path, log=print) -> dict:
    """Train, evaluate and write the model directory; returns the ``eval.json`` dict."""
    from vlmopt.models.evaluate import evaluate

    governor = ThreadGovernor(cfg.threads, log)
    began = time.time()
    model, processor, arch = build_model(cfg.model, cfg.seed, cfg.rope_theta, cfg.mrope_interleaved, cfg.lm_layers)
    base_commands: list[str] = []
    if cfg.init_from:
        start_from(model, Path(cfg.init_from))
        base_commands = recorded_commands(Path(cfg.init_from))  # read now: the run may overwrite that directory
        log(f"weights from {cfg.init_from}")
    task_cfgs = TASK_CONFIGS[cfg.model]
    task_objs = {name: tasks.TASKS[name](c) for name, c in task_cfgs.items()}
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.model}: {n_params / 1e6:.2f}M parameters; {cfg}")

    run = Run.start(model, cfg)
    plan = step_plan(cfg)
    cursors = {name: 0 for name in task_objs}
    history = []
    model.train()
    window = LossWindow()
    for step, task_name in enumerate(plan):
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        if step % 10 == 0:
            governor.update()
        task = task_objs[task_name]
        if task_name == "shapes":
            task = phase_task(task, step, cfg)
        batch_samples = training_batch(task, cfg, cursors[task_name])
        cursors[task_name] += len(batch_samples)
        window.add(*run.step(model, processor, batch_samples, step))
        if (step + 1) % 25 == 0:
            log(f"step {step + 1}/{cfg.steps} lr {lr_at(step, cfg):.2e} {window.report((time.time() - began) / 60)}")
            window = LossWindow()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            point = {"step": step + 1, "minutes": round((time.time() - began) / 60, 2)}
            for name, t in task_objs.items():
                if t.video and step < cfg.video_from:
                    continue
                r = evaluate(model, processor, t, "validation", n=cfg.eval_n, batch_size=16 if not t.video else 8)
                point[name] = round(r.accuracy, 4)
                families = ", ".join(f"{f} {100 * a:.0f}%" for f, a in r.per_family.items())
                log(f"validation {name} at step {step + 1}: {100 * r.accuracy:.1f}% ({families})")
            history.append(point)
            model.train()
    run.taps.remove()
    train_seconds = time.time() - began
    model.eval()
    return finish(cfg, model, processor, arch, task_objs, out_dir, train_seconds, history, n_params, base_commands, log)


def finish(cfg, model, processor, arch, task_objs, out_dir: Path, train_seconds, history, n_params, base_commands, log) -> dict:
    """Save the model directory, then evaluate it and write ``eval.json`` and ``README.md``
    (``base_commands``: the commands that trained the ``--init-from`` weights, first stage first; [] for none)."""
    from vlmopt.models.evaluate import evaluate

    began = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processing.save_processor(processor, out_dir)
    (out_dir / "tasks.json").write_text(
        json.dumps({name: dataclasses.asdict(t.config) for name, t in task_objs.items()}, indent=2) + "\n"
    )
    # evaluate what was written, loaded back the way users load it
    from vlmopt import models

    model, processor = models.load(out_dir)
    results: dict = {
        "model": cfg.model,
        "train_command": train_command(cfg),
        "init_from_commands": base_commands,
        "train_config": dataclasses.asdict(cfg),
        "arch": dataclasses.asdict(arch),
        "parameters": n_params,
        "train_minutes": round(train_seconds / 60, 2),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "history": history,
        "test": {},
    }
    for name, t in task_objs.items():
        bs = 16 if not t.video else 8
        r = evaluate(model, processor, t, "test", n=cfg.test_n, batch_size=bs)
        log(f"test {name}: {r.accuracy:.3f} {r.per_family} ({r.seconds:.0f} s)")
        entry = {"full": r.summary()}
        if name == "shapes":
            c = evaluate(model, processor, t, "test", n=cfg.test_n, batch_size=bs, text_only=True)
            log(f"text-only {name}: {c.accuracy:.3f} {c.per_family}; majority {c.majority['overall']:.3f}")
            entry["text_only"] = c.summary()
        n_fixed = 16 if t.video else 32  # the set tests/models re-checks (kept small: the tests must be fast)
        small = evaluate(model, processor, t, "test", n=n_fixed, batch_size=n_fixed)
        entry["fixed"] = {**small.summary(), "predictions": small.predictions, "correct": small.correct}
        results["test"][name] = entry
    results["eval_minutes"] = round((time.time() - began) / 60, 2)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    from vlmopt.models.card import write_card

    write_card(out_dir, results)
    return results


NO_FLAG = ("model", "curriculum")
"""``TrainConfig`` fields without a ``--flag`` of their own (``--model`` picks the preset)."""


def train_command(cfg: TrainConfig) -> str:
    """The command line that trains ``cfg``: its model's preset plus a flag for each field that differs
    (``threads`` left out: it changes speed, not the result)."""
    preset = PRESETS[cfg.model]
    flags = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in NO_FLAG or f.name == "threads" or value == getattr(preset, f.name):
            continue
        text = ",".join(value) if isinstance(value, tuple) else str(value).lower() if isinstance(value, bool) else str(value)
        flags.append(f" --{f.name.replace('_', '-')} {shlex.quote(text)}")
    command = f"python -m vlmopt.models.train --model {cfg.model}" + "".join(flags)
    return command if cfg.curriculum == preset.curriculum else f"{command} (with TrainConfig.curriculum={cfg.curriculum})"


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _words(text: str) -> tuple[str, ...]:
    return tuple(w for w in text.split(",") if w)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path | None]:
    """(config, output directory or None) of a command line: the model's preset with one flag per field."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, default=None, help="model directory (default: models/<model>)")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in NO_FLAG:
            kind = type(getattr(PRESETS["tiny-llava"], f.name))
            parse = {bool: _flag, tuple: _words}.get(kind, kind)
            parser.add_argument("--" + f.name.replace("_", "-"), type=parse, default=None)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in NO_FLAG and getattr(args, f.name) is not None}
    return dataclasses.replace(PRESETS[args.model], **overrides), args.out


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse_args(argv)
    from vlmopt import models

    out = out or models.models_dir() / cfg.model
    results = train(cfg, out, log=lambda *a: print(*a, flush=True))
    print(json.dumps({k: v for k, v in results.items() if k != "history"}, indent=2)[:4000])
    sys.exit(0)


if __name__ == "__main__":
    main()
