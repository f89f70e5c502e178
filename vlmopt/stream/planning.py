"""Planning of a stream: frames checked and decoded, and the family's planner.

A family's adapter provides the planner (:meth:`vlmopt.adapters.base.Adapter.stream_planner`): the
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


def planner_for(compiled, processor):
    """The stream planner of ``compiled``'s family (:meth:`vlmopt.adapters.base.Adapter.stream_planner`)."""
    adapter = compiled.adapter
    if "stream" not in adapter.capabilities:
        raise UnsupportedModelError(
            f"{type(adapter.model).__name__} does not stream frames: its adapter ({type(adapter).__name__}) has no "
            "stream planner; use generate() on the whole video"
        )
    return adapter.stream_planner(compiled, processor)
