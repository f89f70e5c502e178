"""Per-family planning of a stream: the prompt around the frames, each chunk's graph inputs, positions.

Qwen2.5-VL: the frames of a stream are one video cut into chunks. The cache holds
``[system turn] <|im_start|>user\\n<|vision_start|>`` then every chunk's video tokens; a question is
``<|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n`` — exactly the one-shot prompt of
the same frames and question. Chunk positions continue the video's M-RoPE ids: temporal patch ``t``
(counted from the stream's first frame) at ``start + ⌊t · interval⌋`` on the time axis, rows and columns
at ``start + h`` / ``start + w``; text after the video at ``start + max(h, w)``, as HF's
``get_rope_index`` places it. The tower encodes each frame pair on its own, so chunked encoding is
exact.

LLaVA: every frame is one image (:class:`LlavaStreamPlanner`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlmopt.errors import InputError, UnsupportedModelError

HERMES_LOCAL = "Describe the current scene in detail, focusing on specific objects, fine-grained actions, and spatial relationships."
HERMES_GLOBAL = "Summarize the video narrative, identifying main characters, key events, timeline changes, and the overall theme."


def as_frames(frames: Any) -> np.ndarray:
    """uint8 [T, H, W, 3] from a list of PIL images or an array (a clear error otherwise)."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise InputError("append() got no frames; pass a non-empty list of PIL images or a uint8 array [T, H, W, 3]")
        if all(hasattr(f, "convert") for f in frames):
            sizes = {f.size for f in frames}
            if len(sizes) != 1:
                raise InputError(f"append() got frames of different sizes {sorted(sizes)}; resize them to one size")
            frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
        else:
            raise InputError("append() takes a list of PIL images or one uint8 array [T, H, W, 3]")
    if isinstance(frames, torch.Tensor):
        frames = frames.numpy()
    if not isinstance(frames, np.ndarray):
        raise InputError(f"append() takes PIL images or a uint8 array [T, H, W, 3], got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise InputError(f"frames must be uint8 (0-255 RGB), got {frames.dtype}; convert with (x * 255).astype(np.uint8)")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise InputError(f"frames must be [T, H, W, 3] with T ≥ 1 (RGB), got shape {tuple(frames.shape)}")
    return frames


class QwenStreamPlanner:
    """Chunk inputs and positions of a Qwen2.5-VL stream (see the module docstring)."""

    position_axes = 3
    frame_multiple = 2

    def __init__(self, compiled, processor) -> None:
        from vlmopt.reference.processing import _video_config_of

        self.compiled = compiled
        self.tokenizer = processor.tokenizer
        self.video_cfg = _video_config_of(processor)
        config = compiled.config
        self.video_token = config.video_token_id
        self.tokens_per_second = config.vision_config.tokens_per_second
        self.merge = self.video_cfg["merge_size"]
        self.reset(0)

    def reset(self, start: int) -> None:
        self.start = start
        self.patches = 0
        self.frame_size: tuple[int, int] | None = None
        self.grid: tuple[int, int] | None = None
        self.time_shift = 0

    def text(self, text: str) -> Tensor:
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.long()

    def prefix_ids(self, system_prompt: str) -> Tensor:
        system = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else ""
        return self.text(system + "<|im_start|>user\n<|vision_start|>")

    def question_ids(self, question: str) -> Tensor:
        return self.text(f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")

    def text_positions(self, first: int, count: int) -> Tensor:
        """[3, 1, count] M-RoPE ids of text tokens from ``first``."""
        return (torch.arange(count) + first).view(1, 1, -1).expand(3, 1, -1).contiguous()

    def text_start(self) -> int:
        """Position of text after the frames so far (HF: the video's start + max(h, w))."""
        return self.start + max(self.grid) if self.grid else self.start

    def check(self, frames: np.ndarray) -> None:
        """Refuse frames this stream cannot take (before anything changes)."""
        if frames.shape[0] % self.frame_multiple:
            raise InputError(
                f"Qwen2.5-VL encodes frames in pairs (temporal_patch_size=2); append an even number of frames, got {frames.shape[0]}"
            )
        if self.frame_size is not None and frames.shape[1:3] != self.frame_size:
            raise InputError(
                f"frames of {frames.shape[2]}x{frames.shape[1]} px after frames of {self.frame_size[1]}x{self.frame_size[0]}: "
                "a stream is one video; keep the frame size"
            )

    def chunk(
        self, frames: np.ndarray, cache_length: int, timestamps: list[float] | None, patches: list[int]
    ) -> tuple[dict[str, Any], Tensor]:
        """(graph inputs of the chunk stage, the chunk's position ids [3, n]); ``patches`` are the
        frames' temporal patch indices counted from the stream's first frame (gaps where frames were
        dropped)."""
        from vlmopt.reference.processing import qwen_video_inputs

        video = qwen_video_inputs(frames, self.video_cfg)
        t, h, w = (int(v) for v in video["video_grid_thw"][0])
        grid = (h // self.merge, w // self.merge)
        count = t * grid[0] * grid[1]
        if timestamps is not None:
            times = torch.tensor([float(s) for s in timestamps[:: self.frame_multiple]])
            temporal = (times * self.tokens_per_second).long()
        else:
            interval = self.tokens_per_second * video["second_per_grid_ts"][0]
            temporal = (torch.tensor(patches) * interval).long()
        temporal = temporal + self.start - self.time_shift
        rows, cols = torch.arange(grid[0]) + self.start, torch.arange(grid[1]) + self.start
        tt, hh, ww = torch.meshgrid(temporal, rows, cols, indexing="ij")
        positions = torch.stack([tt, hh, ww]).reshape(3, count)
        ids = torch.full((1, count), self.video_token, dtype=torch.long)
        batch = {
            "input_ids": ids, "pixel_values_videos": video["pixel_values_videos"],
            "video_grid_thw": video["video_grid_thw"], "second_per_grid_ts": video["second_per_grid_ts"],
            "position_ids": positions[:, None, :], "mm_token_type_ids": torch.full_like(ids, 2),
        }
        prompt = self.compiled.plan(batch)
        inputs = dict(prompt.inputs, attention_mask=torch.ones(1, cache_length + count, dtype=torch.long))
        self.frame_size, self.grid = frames.shape[1:3], grid
        self.patches = patches[-1] + 1
        return inputs, positions

    def after_reindex(self, positions: Tensor) -> None:
        """Continue the time axis after the largest id left in the cache once positions were compacted."""
        natural = int((torch.tensor(self.patches) * self.tokens_per_second * self._seconds()).long()) + self.start
        self.time_shift = natural - (int(positions[:, 0].max()) + 1)

    def _seconds(self) -> float:
        return self.video_cfg["temporal_patch_size"] / self.video_cfg["fps"]


class LlavaStreamPlanner:
    """Chunk inputs and positions of a LLaVA stream: every frame is one image (``<image>`` expanded to
    the tower's tokens, then a newline), 1-D positions counting on, as in the one-shot prompt
    ``USER: <image>\n<image>\n… {question} ASSISTANT:``."""

    position_axes = 1
    frame_multiple = 1

    def __init__(self, compiled, processor) -> None:
        self.compiled = compiled
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_token = compiled.config.image_token_id
        self.tokens_per_image = compiled.adapter.tokens_per_image
        self.newline = self.text("\n")
        self.reset(0)

    def reset(self, start: int) -> None:
        self.next = start
        self.patches = 0
        self.frame_size: tuple[int, int] | None = None

    def text(self, text: str) -> Tensor:
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].long()

    def prefix_ids(self, system_prompt: str) -> Tensor:
        bos = self.tokenizer.bos_token or ""
        return self.text(f"{bos}{system_prompt + ' ' if system_prompt else ''}USER: ")

    def question_ids(self, question: str) -> Tensor:
        return self.text(f"{question} ASSISTANT:")

    def text_positions(self, first: int, count: int) -> Tensor:
        return (torch.arange(count) + first).view(1, 1, -1)

    def text_start(self) -> int:
        return self.next

    def check(self, frames: np.ndarray) -> None:
        if self.frame_size is not None and frames.shape[1:3] != self.frame_size:
            raise InputError(
                f"frames of {frames.shape[2]}x{frames.shape[1]} px after frames of {self.frame_size[1]}x{self.frame_size[0]}: "
                "a stream is one video; keep the frame size"
            )

    def chunk(self, frames: np.ndarray, cache_length: int, timestamps, patches) -> tuple[dict[str, Any], Tensor]:
        from PIL import Image

        pixels = self.image_processor([Image.fromarray(f) for f in frames], return_tensors="pt")["pixel_values"]
        frame_ids = torch.cat([torch.full((1, self.tokens_per_image), self.image_token), self.newline], dim=1)
        ids = frame_ids.repeat(1, frames.shape[0])
        positions = (torch.arange(ids.shape[1]) + self.next)[None]
        prompt = self.compiled.plan({"input_ids": ids, "pixel_values": pixels, "position_ids": positions})
        inputs = dict(prompt.inputs, attention_mask=torch.ones(1, cache_length + ids.shape[1], dtype=torch.long))
        self.frame_size = frames.shape[1:3]
        self.next += ids.shape[1]
        return inputs, positions

    def after_reindex(self, positions: Tensor) -> None:
        self.next = int(positions.max()) + 1


def planner_for(compiled, processor):
    if compiled.adapter.family == "qwen2_5_vl":
        return QwenStreamPlanner(compiled, processor)
    if compiled.adapter.family == "llava":
        return LlavaStreamPlanner(compiled, processor)
    raise UnsupportedModelError(f"streams support Qwen2.5-VL and LLaVA models; this model is {compiled.adapter.family}")
