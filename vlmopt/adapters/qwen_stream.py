"""A stream of video frames on a Qwen VL model (``Stream`` planning, :mod:`vlmopt.stream.planning`).

Streams: the frames of a stream are one video cut into chunks. The cache holds
``[system turn] <|im_start|>user\\n<|vision_start|>`` then every chunk's video tokens; a question is
``<|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n`` — exactly the one-shot prompt of
the same frames and question. Chunk positions continue the video's M-RoPE ids: temporal patch ``t``
(counted from the stream's first frame) at ``start + ⌊t · interval⌋`` on the time axis, rows and columns
at ``start + h`` / ``start + w``; text after the video at ``start + max(h, w)``, as HF's
``get_rope_index`` places it. The tower encodes each frame pair on its own, so chunked encoding is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlmopt.stream.planning import StreamPlanner


class QwenStreamPlanner(StreamPlanner):
    """Chunk inputs and positions of a Qwen2.5-VL stream (see the module docstring)."""

    position_axes = 3

    def __init__(self, compiled, processor) -> None:
        from vlmopt.reference.processing import _video_config_of

        self.compiled = compiled
        self.tokenizer = processor.tokenizer
        self.video_cfg = _video_config_of(processor)
        config = compiled.config
        self.video_token = config.video_token_id
        self.tokens_per_second = getattr(config.vision_config, "tokens_per_second", 1)
        self.merge = self.video_cfg["merge_size"]
        self.frame_multiple = self.video_cfg["temporal_patch_size"]
        self.reset(0)

    def reset(self, start: int) -> None:
        self.start = start
        self.patches = 0
        self.frame_size: tuple[int, int] | None = None
        self.grid: tuple[int, int] | None = None
        self.time_shift = 0

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

    def visual_tokens(self, frames: np.ndarray) -> int:
        """Cache entries ``frames`` take: the video processor's grid, merged."""
        from vlmopt.reference.processing import video_grid

        t, h, w, _, _ = video_grid(frames.shape[0], frames.shape[1], frames.shape[2], self.video_cfg)
        return t * (h // self.merge) * (w // self.merge)

    def video(self, frames: np.ndarray) -> dict[str, Tensor]:
        from vlmopt.reference.processing import qwen_video_inputs

        return qwen_video_inputs(frames, self.video_cfg)

    def chunk(
        self, frames: np.ndarray, cache_length: int, timestamps: list[float] | None, patches: list[int]
    ) -> tuple[dict[str, Any], Tensor]:
        """(graph inputs of the chunk stage, the chunk's position ids [3, n]); ``patches`` are the
        frames' temporal patch indices counted from the stream's first frame (gaps where frames were
        dropped)."""
        video = self.video(frames)
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
