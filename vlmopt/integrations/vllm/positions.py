"""M-RoPE positions of prompts whose visual inputs were pruned (no vLLM import).

vlmopt's position policy: every kept visual token keeps the position the unpruned prompt gives it,
and every text token keeps its own (HF's ``get_rope_index`` of the unpruned prompt). In vLLM a visual
input is one *span* of prompt rows that the model fills (its placeholder range):

* an image, or a video written as one grid: the visual tokens alone;
* a video written patch by patch: per temporal patch, its text (a timestamp) and start marker, the
  patch's tokens, its end marker (the text rows are filled with their token embeddings).

Positions inside a span depend on which tokens the tower's attention keeps, so the model writes them
next to the span's rows (:func:`grid_positions`, :func:`video_span`); positions outside spans depend
only on the grids, so they are known before the tower runs (:func:`prompt_positions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def grid_positions(grid: tuple[int, int, int], t_step: float = 1.0) -> np.ndarray:
    """[3, t·h·w] int64 (t, h, w) positions of a merged token grid in raster order, relative to its
    first token; the temporal id of patch i is ``int(i · t_step)`` (a video whose temporal ids follow
    time: seconds per patch · ids per second; 1 for images)."""
    t, h, w = grid
    ids = np.indices((t, h, w)).reshape(3, -1).astype(np.int64)
    if t_step != 1.0:
        ids[0] = (ids[0] * t_step).astype(np.int64)
    return ids


def grid_extent(grid: tuple[int, int, int], t_step: float = 1.0) -> int:
    """Positions a grid span advances the text after it by: its largest id + 1."""
    t, h, w = grid
    return int(max(int((t - 1) * t_step), h - 1, w - 1)) + 1


def frame_text_counts(span_ids: Sequence[int], vision_start: int, vision_end: int) -> list[int]:
    """Per temporal patch of a video span written patch by patch (token ids), the text rows before its
    tokens: its timestamp tokens and its start marker."""
    counts, start = [], 0
    for index, token in enumerate(span_ids):
        if token == vision_start:
            counts.append(index - start + 1)
        elif token == vision_end:
            start = index + 1
    return counts


def video_span(text_counts: Sequence[int], grid: tuple[int, int, int], keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """A patch-by-patch video's span with the tokens ``keep`` (ascending indices into the t·h·w grid):
    (positions [3, n] relative to the span's first row, visual [n] bool, extent).

    Rows per temporal patch i: ``text_counts[i]`` text rows (timestamp, start marker), its kept
    tokens at ``(0, row, col)`` after them, the end marker. Every patch's positions are those of the
    unpruned span: a patch's text starts one past the previous patch's largest id.
    """
    t, h, w = grid
    keep = np.asarray(keep, dtype=np.int64)
    frame_of = keep // (h * w)
    positions, visual, cursor = [], [], 0
    for patch, count in enumerate(text_counts[:t]):
        text = np.arange(cursor, cursor + count, dtype=np.int64)
        positions.append(np.broadcast_to(text, (3, count)))
        visual.append(np.zeros(count, dtype=bool))
        cursor += count
        kept = keep[frame_of == patch] - patch * h * w
        frame = np.stack([np.zeros_like(kept), kept // w, kept % w]) + cursor
        positions.append(frame)
        visual.append(np.ones(kept.size, dtype=bool))
        cursor += max(h, w)
        positions.append(np.full((3, 1), cursor, dtype=np.int64))
        visual.append(np.zeros(1, dtype=bool))
        cursor += 1
    return np.concatenate(positions, axis=1), np.concatenate(visual), cursor


def prompt_positions(length: int, spans: Sequence[tuple[int, int, int]]) -> tuple[np.ndarray, int]:
    """(positions [3, length], delta) of a prompt whose visual spans are ``(offset, rows, extent)``.

    Text rows count on one by one; a span starts at the next position (its *base*) and the text after
    it continues at ``base + extent``. Every row of a span gets its base: the model adds each row's
    position relative to the span (:func:`grid_positions`, :func:`video_span`) once the tower has
    chosen the rows. ``delta`` is the next position minus the length, as vLLM continues decoding.
    """
    positions = np.empty((3, length), dtype=np.int64)
    cursor, row = 0, 0
    for offset, rows, extent in sorted(spans):
        if offset < row or offset + rows > length:
            raise ValueError(f"visual span at {offset} (+{rows}) overlaps another or leaves the {length}-token prompt")
        positions[:, row:offset] = np.arange(cursor, cursor + offset - row)
        cursor += offset - row
        positions[:, offset : offset + rows] = cursor
        cursor, row = cursor + extent, offset + rows
    positions[:, row:] = np.arange(cursor, cursor + length - row)
    cursor += length - row
    return positions, cursor - length
