"""Train a reference model from scratch on the synthetic tasks and write its directory.

    python -m models.train --model tiny-llava
    python -m models.train --model tiny-qwen25vl
    python -m models.train --model tiny-qwen3vl

Training data is rendered on the fly from the ``train`` split (sample ``i`` of step ``s`` is train
index ``s * batch + i``), so a run is reproducible from its seed. Every ``--checkpoint-every`` steps
(25) the run saves its state in ``<out>/.checkpoint/``; the same command started again resumes from
it (:mod:`models.train.resume`). The language-model loss covers the
answer tokens only (one word + end token). Auxiliary losses speed the from-scratch vision tower up
(``--aux-weight 0`` turns them off); their heads are discarded, the saved model is the plain HF one:

* per visual token (LLaVA: CLIP patch features at the selected layer; Qwen2.5-VL, Qwen3-VL: merged tokens): the
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

from models.train.build import build_model
from models.train.checkpoint import lm_layer_index, lm_layers_appended, recorded_commands, start_from
from models.train.cli import main, parse_args
from models.train.config import NO_FLAG, PRESETS, TASK_CONFIGS, TrainConfig, train_command
from models.train.governor import ThreadGovernor
from models.train.heads import AuxHeads
from models.train.hooks import AttentionTap, OutputTap, Taps, VisionTap
from models.train.lm_guide import GuideRules, attribute_words, guide_loss, guided_middle_layers, lm_attention_rows
from models.train.loop import finish, train
from models.train.resume import Progress
from models.train.schedule import lr_at, phase_task, step_plan, training_batch
from models.train.step import LossWindow, Run, drop_background, forward_loss, qwen_image_positions
from models.train.targets import (
    COORD_SCALE,
    COUNT_CLASSES,
    NEIGHBOUR_ATTRIBUTES,
    answer_starts,
    aux_targets,
    cell_targets,
    neighbour_targets,
    object_cells,
    presence_targets,
    relation_targets,
    token_cell,
    track_tokens,
    training_turns,
)
from models.train.tower_guide import neighbour_guide_loss, qwen_windows, tower_guide_loss

__all__ = [
    "COORD_SCALE", "COUNT_CLASSES", "NEIGHBOUR_ATTRIBUTES", "NO_FLAG", "PRESETS", "TASK_CONFIGS", "AttentionTap",
    "AuxHeads", "GuideRules", "LossWindow", "OutputTap", "Progress", "Run", "Taps", "ThreadGovernor", "TrainConfig", "VisionTap",
    "answer_starts", "attribute_words", "aux_targets", "build_model", "cell_targets", "drop_background", "finish",
    "forward_loss", "guide_loss", "guided_middle_layers", "lm_attention_rows", "lm_layer_index", "lm_layers_appended",
    "lr_at", "main", "neighbour_guide_loss", "neighbour_targets", "object_cells", "parse_args", "phase_task",
    "presence_targets", "qwen_image_positions", "qwen_windows", "recorded_commands", "relation_targets", "start_from",
    "step_plan", "token_cell", "tower_guide_loss", "track_tokens", "train", "train_command", "training_batch",
    "training_turns",
]
