"""Processors of tiled ("any-resolution") VLMs, built offline: LLaVA-NeXT and LLaVA-OneVision.

Both cut an image into a base image at the tower's size plus the best-fit tiles of
``image_grid_pinpoints`` (``select_best_resolution``), all at the tower's side ``tile``; the processor
expands ``<image>`` into the base image's tokens, the unpadded high-resolution grid's tokens and one
newline per grid row (OneVision resamples a grid larger than ``anyres_max_N`` tiles first). Prompts:

* ``llava_next``: LLaVA's ``USER: <image>\\n{question} ASSISTANT:`` (tokenizer with LLaVA's special ids);
* ``llava_onevision``: ``<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n``
  (``<video>`` for a video), special ids ``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2,
  ``<image>`` 3, ``<video>`` 4.

OneVision videos: ``LlavaOnevisionVideoProcessor`` needs torchvision, which is not installed here, so
:func:`onevision_video_inputs` builds ``pixel_values_videos`` by hand with the video processor's
settings (resize to the tower's side, bicubic — PIL's here, torchvision's there —, 1/255, CLIP mean and
std) and :func:`onevision_video_tokens` counts a video's ``<video>`` tokens as
``LlavaOnevisionProcessor.replace_video_token`` does: ``frames · ⌈√n / 2⌉² + 1`` (a 2×2-pooled grid
per frame, one newline after the video); ``tests/reference`` checks both against the HF source.
"""

from __future__ import annotations

import json
import math
import unittest.mock
from pathlib import Path

import numpy as np
import torch

NEXT, ONEVISION = "llava_next", "llava_onevision"
TILED_ARCHS = (NEXT, ONEVISION)
ONEVISION_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>")
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SETTINGS_FILE = "tiled_processor.json"
"""What :func:`save_tiled` writes beside the tokenizer and image processor (OneVision's processor
class cannot be loaded by ``AutoProcessor`` without torchvision)."""


def next_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-NeXT's ``image_grid_pinpoints`` (1×2, 2×1, 2×2, 3×1, 1×3 tiles) for tiles of ``tile`` px."""
    return [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]


def onevision_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-OneVision's ``image_grid_pinpoints`` (every grid of 1..6 × 1..6 tiles) for tiles of ``tile`` px."""
    return [[rows * tile, cols * tile] for rows in range(1, 7) for cols in range(1, 7)]


def build_tiled_processor(
    arch: str, tile: int, patch: int = 14, pinpoints: list[list[int]] | None = None, strategy: str | None = None,
    aspect_ratio: str = "anyres_max_9",
):
    """``LlavaNextProcessor`` or ``LlavaOnevisionProcessor`` (without a video processor) with the word-level
    tokenizer of ``arch``; ``tile`` the tower's side, ``patch`` its patch side, ``pinpoints`` the model's
    ``image_grid_pinpoints`` (default: the family's, for ``tile``), ``strategy`` its
    ``vision_feature_select_strategy`` (default: NeXT's ``"default"``, which drops CLIP's CLS token;
    OneVision's ``"full"``), ``aspect_ratio`` OneVision's ``vision_aspect_ratio``."""
    from vlmopt.reference.processing import LLAVA_CHAT_TEMPLATE, build_tokenizer

    pinpoints = pinpoints or (next_pinpoints if arch == NEXT else onevision_pinpoints)(tile)
    strategy = strategy or ("default" if arch == NEXT else "full")
    tokenizer = build_tokenizer(arch)
    if arch == NEXT:
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        images = LlavaNextImageProcessorPil(
            size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
        )
        return LlavaNextProcessor(
            image_processor=images, tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy=strategy,
            num_additional_image_tokens=int(strategy == "default"), chat_template=LLAVA_CHAT_TEMPLATE,
        )
    from transformers import LlavaOnevisionImageProcessorPil

    images = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    return onevision_processor(images, tokenizer, ONEVISION_CHAT_TEMPLATE, (tile // patch) ** 2, strategy, aspect_ratio)


def onevision_processor(images, tokenizer, chat_template, num_image_tokens: int, strategy: str, aspect_ratio: str):
    """``LlavaOnevisionProcessor`` without a video processor (its class check skipped for that slot)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, arg):
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    with unittest.mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lenient):
        return LlavaOnevisionProcessor(
            image_processor=images, tokenizer=tokenizer, video_processor=None, num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=strategy, chat_template=chat_template, vision_aspect_ratio=aspect_ratio,
        )


def tile_side(processor) -> int:
    """The tower's side (px) a tiled processor resizes every tile and video frame to."""
    size = processor.image_processor.size
    return int(size["height"] if "height" in size else size["shortest_edge"])


def onevision_video_tokens(num_frames: int, processor) -> int:
    """``<video>`` tokens of a clip of ``num_frames`` frames (``replace_video_token``'s count)."""
    pooled = math.ceil(int(math.sqrt(processor.num_image_tokens)) / 2)
    return num_frames * pooled * pooled + 1


def onevision_video_inputs(frames: np.ndarray, processor) -> dict[str, torch.Tensor]:
    """``pixel_values_videos`` [1, T, 3, s, s] (float32) of one clip, uint8 ``frames`` [T, H, W, 3], as
    ``LlavaOnevisionVideoProcessor`` makes them (``s`` the tower's side; bicubic resize when H, W ≠ s)."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    side = tile_side(processor)
    if frames.shape[1:3] != (side, side):
        from PIL import Image

        frames = np.stack([np.asarray(Image.fromarray(f).resize((side, side), Image.BICUBIC)) for f in frames])
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return {"pixel_values_videos": ((x - mean) / std)[None]}


def encode_onevision_videos(processor, texts: list[str], clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Tokenised prompts (each ``<video>`` expanded) and ``pixel_values_videos`` [N, T, 3, s, s] of clips
    of one length (HF stacks a batch's videos)."""
    if len({len(c) for c in clips}) != 1:
        raise ValueError("a batch of OneVision videos needs clips of one length (HF stacks them into one tensor)")
    tokens = onevision_video_tokens(len(clips[0]), processor)
    out = dict(processor.tokenizer([t.replace("<video>", "<video>" * tokens) for t in texts], return_tensors="pt", padding=True))
    out["pixel_values_videos"] = torch.cat([onevision_video_inputs(c, processor)["pixel_values_videos"] for c in clips])
    return out


def save_tiled(processor, path: Path) -> None:
    """Write a OneVision processor (tokenizer, image processor, chat template, its settings)."""
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    (path / "chat_template.jinja").write_text(processor.chat_template)
    settings = {"processor_class": type(processor).__name__, "num_image_tokens": processor.num_image_tokens,
                "vision_feature_select_strategy": processor.vision_feature_select_strategy,
                "vision_aspect_ratio": processor.vision_aspect_ratio}
    (path / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def load_tiled(path: Path):
    """The processor :func:`save_tiled` wrote into ``path``."""
    from transformers import AutoImageProcessor, AutoTokenizer

    settings = json.loads((path / SETTINGS_FILE).read_text())
    return onevision_processor(
        AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path), (path / "chat_template.jinja").read_text(),
        settings["num_image_tokens"], settings["vision_feature_select_strategy"], settings["vision_aspect_ratio"],
    )
