"""Planning of a stream: frames checked and decoded, and the family's planner.

A family's adapter provides the planner (:meth:`vlmopt.adapters.base.Adapter.stream_planner`, a
:class:`StreamPlanner`): the
prompt around the frames (``prefix_ids``, ``question_ids``), each chunk's graph inputs and positions
(``chunk``), the position of text after the frames (``text_start``, ``text_positions``), and what a
re-indexing of positions means for the next chunk (``after_reindex``), the cache entries frames take
(``visual_tokens``); ``frame_multiple`` frames are encoded together. A planner whose one-shot prompt puts
visual features between the frames and the question (a video's closing newline) writes them into the
cache at the start of each question (``prelude(cache, cache_length)``, returning how many). A stream with
no pass equals the one-shot prompt of the same frames and question.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vlmopt.errors import InputError, UnsupportedModelError


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


class StreamPlanner:
    """What the families' stream planners share (see the module docstring): frames checked against the
    stream's frame size and ``frame_multiple``, text tokenized without special tokens, 1-D text
    positions counting on from the last chunk (``next``), nothing written before a question. A family
    gives ``prefix_ids``, ``question_ids``, ``visual_tokens`` and ``chunk``; an M-RoPE family overrides
    the positions."""

    position_axes = 1
    frame_multiple = 1
    tokenizer: Any

    def reset(self, start: int) -> None:
        """Start a stream whose frames come after ``start`` prompt tokens."""
        self.next = start
        self.patches = 0
        self.frame_size: tuple[int, int] | None = None

    def text(self, text: str) -> torch.Tensor:
        """Token ids [1, N] of ``text`` (no special tokens added)."""
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].long()

    def text_positions(self, first: int, count: int) -> torch.Tensor:
        """Positions [1, 1, count] of ``count`` text tokens from position ``first``."""
        return (torch.arange(count) + first).view(1, 1, -1)

    def text_start(self) -> int:
        """The position of text after the frames so far."""
        return self.next

    def check(self, frames: np.ndarray) -> None:
        """Refuse frames this stream cannot take (before anything changes)."""
        if frames.shape[0] % self.frame_multiple:
            raise InputError(
                f"this model encodes frames in groups of {self.frame_multiple} (temporal_patch_size); append a "
                f"multiple of {self.frame_multiple} frames, got {frames.shape[0]}"
            )
        if self.frame_size is not None and frames.shape[1:3] != self.frame_size:
            raise InputError(
                f"frames of {frames.shape[2]}x{frames.shape[1]} px after frames of {self.frame_size[1]}x{self.frame_size[0]}: "
                "a stream is one video; keep the frame size"
            )

    def after_reindex(self, positions: torch.Tensor) -> None:
        """The cache's positions were re-indexed to ``positions``: the next chunk counts on from them."""
        self.next = int(positions.max()) + 1

    def prelude(self, cache: Any, cache_length: int) -> int:
        """Write what the one-shot prompt holds between the frames and a question into ``cache``; how many entries."""
        return 0


def planner_for(compiled, processor):
    """The stream planner of ``compiled``'s family (:meth:`vlmopt.adapters.base.Adapter.stream_planner`)."""
    adapter = compiled.adapter
    if "stream" not in adapter.capabilities:
        raise UnsupportedModelError(
            f"{type(adapter.model).__name__} does not stream frames: its adapter ({type(adapter).__name__}) has no "
            "stream planner; use generate() on the whole video"
        )
    return adapter.stream_planner(compiled, processor)
