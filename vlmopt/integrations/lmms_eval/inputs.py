"""Turn lmms-eval requests (a context string and the task's visuals) into a model batch.

Visuals, as a task's ``doc_to_visual`` returns them: PIL images, uint8 arrays [H, W, 3] (an image)
or [T, H, W, 3] (a video's frames), or file paths (images by extension; ``.mp4``/``.avi``/``.mov``/
``.webm``/``.mkv`` videos, decoded with lmms-eval's PyAV reader). The prompt is the processor's own
chat template applied to one user turn: the visuals, then the context (or the visuals where the
context writes ``<image>`` placeholders, one per image), so a reference model sees exactly the prompt
``vlmopt eval`` gives it (:func:`vlmopt.reference.processing.prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmopt.errors import InputError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".webm", ".mkv")
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Prompt:
    """One request's prompt: the context text and its visuals, in order."""

    context: str
    """The task's question text (``doc_to_text``)."""
    images: list[Any] = field(default_factory=list)
    """PIL RGB images."""
    videos: list[np.ndarray] = field(default_factory=list)
    """Videos as uint8 frames [T, H, W, 3]."""

    @property
    def kind(self) -> str:
        """``"video"``, ``"image"`` or ``"text"``: requests batch only with their own kind."""
        return "video" if self.videos else "image" if self.images else "text"


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        out = []
        for item in visuals:
            out += _flatten(item)
        return out
    return [visuals]


def kind_of(visuals: Any) -> str:
    """``"video"``, ``"image"`` or ``"text"`` for a request's visuals, without decoding them."""
    items = _flatten(visuals)
    for item in items:
        if (isinstance(item, np.ndarray) and item.ndim == 4) or (
            isinstance(item, (str, Path)) and str(item).lower().endswith(VIDEO_SUFFIXES)
        ):
            return "video"
    return "image" if items else "text"


def prompt_of(context: str, visuals: Any, max_frames: int) -> Prompt:
    """Sort a request's visuals into images and videos (see the module docstring for the forms)."""
    from PIL import Image

    prompt = Prompt(context)
    for item in _flatten(visuals):
        if isinstance(item, Image.Image):
            prompt.images.append(item.convert("RGB"))
        elif isinstance(item, np.ndarray) and item.ndim == 3 and item.shape[-1] == 3:
            prompt.images.append(Image.fromarray(np.ascontiguousarray(item, dtype=np.uint8)))
        elif isinstance(item, np.ndarray) and item.ndim == 4 and item.shape[-1] == 3:
            prompt.videos.append(np.ascontiguousarray(item, dtype=np.uint8))
        elif isinstance(item, (str, Path)) and str(item).lower().endswith(VIDEO_SUFFIXES):
            from lmms_eval.models.model_utils.load_video import read_video

            prompt.videos.append(read_video(str(item), num_frm=max_frames))
        elif isinstance(item, (str, Path)) and Path(item).is_file():
            prompt.images.append(Image.open(item).convert("RGB"))
        else:
            shape = getattr(item, "shape", None)
            raise InputError(
                f"lmms-eval visual of type {type(item).__name__}{'' if shape is None else f' {tuple(shape)}'} is not "
                "supported; vlmopt reads PIL images, uint8 arrays [H, W, 3] (image) or [T, H, W, 3] (video), and "
                f"image or video file paths ({', '.join(VIDEO_SUFFIXES)})"
            )
    if prompt.images and prompt.videos:
        raise InputError("a prompt with both images and videos is not supported by vlmopt's lmms-eval model; "
                         "give a task's prompt images or videos, not both")
    return prompt


def chat_text(processor, prompt: Prompt) -> str:
    """The prompt text through the processor's chat template, visual placeholders not yet expanded."""
    if getattr(processor, "chat_template", None) is None:
        raise InputError(f"{type(processor).__name__} has no chat template; vlmopt's lmms-eval model builds "
                         "prompts with it (save one with the checkpoint: processor.chat_template = ...)")
    visuals = [{"type": "image"}] * len(prompt.images) + [{"type": "video"}] * len(prompt.videos)
    pieces = prompt.context.split(IMAGE_PLACEHOLDER)
    if prompt.images and len(pieces) == len(prompt.images) + 1:
        content = []
        for i, piece in enumerate(pieces):
            if piece:
                content.append({"type": "text", "text": piece})
            if i < len(prompt.images):
                content.append({"type": "image"})
    else:
        content = visuals + [{"type": "text", "text": prompt.context}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(processor, arch: str, prompts: list[Prompt], suffixes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Model inputs for a batch of prompts of one kind, left-padded; ``suffixes[i]`` is appended to
    prompt ``i``'s text after the chat template (a continuation to score).

    Images go through the HF processor. Qwen videos go through the processor's video processor where
    it has one, else (no torchvision) through :func:`vlmopt.reference.video_inputs.video_batch`,
    exactly as :func:`vlmopt.reference.processing.encode` does.
    """
    from vlmopt.reference import processing

    kinds = {p.kind for p in prompts}
    if len(kinds) > 1:
        raise InputError(f"encode() takes prompts of one kind, got {sorted(kinds)}")
    tok = processor.tokenizer
    tok.padding_side = "left"
    texts = [chat_text(processor, p) + (suffixes[i] if suffixes else "") for i, p in enumerate(prompts)]
    images = [image for p in prompts for image in p.images]
    videos = [video for p in prompts for video in p.videos]
    if videos and arch not in processing.QWEN_ARCHS:
        raise InputError(f"video input is not supported for this model family ({arch}); the Qwen families read videos")
    if videos and getattr(processor, "video_processor", None) is not None:
        out = dict(processor(text=texts, images=images or None, videos=videos, return_tensors="pt", padding=True))
    elif videos:
        texts, inputs = processing.video_batch(processor, texts, [list(p.videos) for p in prompts])
        out = dict(tok(texts, return_tensors="pt", padding=True), **inputs)
    elif images:
        out = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
    else:
        out = dict(tok(texts, return_tensors="pt", padding=True))
    if arch in processing.QWEN_ARCHS and "mm_token_type_ids" not in out:
        out["mm_token_type_ids"] = processing.qwen_token_types(tok, out["input_ids"])
    return out
