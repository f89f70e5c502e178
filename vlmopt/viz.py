"""Draw which visual tokens a pruning pass keeps, on the image the model actually saw.

The image is rebuilt from the processor's ``pixel_values`` (un-normalised, and un-patchified by the
adapter), so every token box lines up with what the vision tower read. Kept tokens are
outlined by kind — HiPrune's anchors, buffers and registers, or just "kept" for other passes —
and dropped tokens are dimmed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlmopt.graph.edit import GraphEditor
from vlmopt.graph.probe import run_with_probes
from vlmopt.ops.hiprune_select import ANCHOR, BUFFER, REGISTER
from vlmopt.runtime import CompiledVLM

KIND_NAMES = {ANCHOR: "anchor", BUFFER: "buffer", REGISTER: "register", -1: "kept"}
KIND_COLOURS = {ANCHOR: (230, 30, 30), BUFFER: (255, 160, 0), REGISTER: (40, 110, 255), -1: (20, 200, 60)}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class KeptTokens:
    """Which tokens of each visual input reach the LLM."""

    grids: list[tuple[int, int, int]]
    """(t, h, w) token grid of each visual input."""
    kept: list[np.ndarray]
    """Kept token indices of each input (raster order within the input)."""
    kinds: list[np.ndarray]
    """Kind of each kept token (0 anchor, 1 buffer, 2 register; -1 when the pass has no kinds)."""


def kept_tokens(compiled: CompiledVLM, batch: dict[str, Any]) -> KeptTokens:
    """Run the prefill node by node and read which visual tokens it kept."""
    prompt = compiled.plan(batch)
    if prompt.layout is None or prompt.layout.grids is None:
        raise ValueError("the batch has no visual input on a token grid to draw")
    module = compiled.stages[prompt.stage]
    merge = next(n for n in module.graph.nodes if n.meta.get("role") == "merge")
    slots_node = GraphEditor(module).input_of(merge, "positions")
    # the slots of the visual tokens in layout order, as the unrewritten graph hands them to the merge
    # (the planned visual_positions, or an adapter's reordering of them: a tiled image's tile by tile)
    from vlmopt.graph.capture import capture

    plain = capture(compiled.adapter.prefill_pipeline(), "prefill")
    source = GraphEditor(plain).input_of(GraphEditor(plain).one("merge"), "positions").name
    wanted = {slots_node.name, "token_kinds", source}
    inputs = dict(prompt.inputs, cache=None, logits_to_keep=1)
    with torch.inference_mode():
        _, values = run_with_probes(module, inputs, lambda n: n.name in wanted)
    slots = values[source] if source in values else prompt.inputs[source]
    index_of = {int(slot): i for i, slot in enumerate(slots.tolist())}
    kept_global = np.array([index_of[int(slot)] for slot in values[slots_node.name].tolist()], dtype=np.int64)
    layout = prompt.layout
    starts = np.cumsum((0,) + layout.counts[:-1])
    # grid cell of each of the batch's visual tokens (-1: a structural token, CLS or newline, not drawn)
    cells = np.full(layout.total, -1, dtype=np.int64)
    for index, start in enumerate(starts):
        cells[start + np.array(layout.grid_indices(index), dtype=np.int64)] = np.arange(layout.grid_counts[index])
    kept_grid = kept_global[cells[kept_global] >= 0]
    kinds = values.get("token_kinds")
    kinds = kinds.numpy() if kinds is not None else np.full(len(kept_grid), -1)
    grids, kept, kind_lists = list(layout.grids), [], []
    for start, count in zip(starts, layout.counts):
        mine = (kept_grid >= start) & (kept_grid < start + count)
        kept.append(cells[kept_grid[mine]])
        kind_lists.append(kinds[mine])
    return KeptTokens(grids, kept, kind_lists)


def images_from_pixels(model, processor, batch: dict[str, Any]) -> list[np.ndarray]:
    """The images [H, W, 3] uint8 the vision tower saw, rebuilt from ``pixel_values``."""
    image_processor = getattr(processor, "image_processor", None)
    mean = np.array(getattr(image_processor, "image_mean", None) or CLIP_MEAN)
    std = np.array(getattr(image_processor, "image_std", None) or CLIP_STD)
    from vlmopt.adapters import adapter_for

    frames = adapter_for(model).pixel_frames(batch)
    return [np.clip((f * std + mean) * 255, 0, 255).astype(np.uint8) for f in frames]


def draw(image: np.ndarray, grid: tuple[int, int, int], kept: np.ndarray, kinds: np.ndarray):
    """A PIL image: dropped tokens dimmed, kept tokens outlined in their kind's colour, with a legend."""
    from PIL import Image, ImageDraw

    _, rows, cols = grid
    height, width = image.shape[:2]
    cell_h, cell_w = height / rows, width / cols
    dim = (image * 0.35).astype(np.uint8)
    canvas = dim.copy()
    for index in kept[kept < rows * cols]:
        r, c = divmod(int(index), cols)
        y0, y1, x0, x1 = int(r * cell_h), int((r + 1) * cell_h), int(c * cell_w), int((c + 1) * cell_w)
        canvas[y0:y1, x0:x1] = image[y0:y1, x0:x1]
    picture = Image.fromarray(canvas).resize((max(width, 448), max(height, 448) * height // max(height, 1)), Image.NEAREST)
    scale_x, scale_y = picture.width / width, picture.height / height
    pen = ImageDraw.Draw(picture)
    for index, kind in zip(kept, kinds):
        if index >= rows * cols:
            continue
        r, c = divmod(int(index), cols)
        box = (c * cell_w * scale_x, r * cell_h * scale_y, (c + 1) * cell_w * scale_x - 1, (r + 1) * cell_h * scale_y - 1)
        pen.rectangle(box, outline=KIND_COLOURS[int(kind)], width=2)
    legend = [(k, n) for k, n in KIND_NAMES.items() if (kinds == k).any()]
    board = Image.new("RGB", (picture.width, picture.height + 22), "white")
    board.paste(picture, (0, 0))
    pen = ImageDraw.Draw(board)
    x = 4
    for kind, name in legend:
        count = int((kinds == kind).sum())
        pen.rectangle((x, picture.height + 5, x + 12, picture.height + 17), fill=KIND_COLOURS[kind])
        pen.text((x + 16, picture.height + 5), f"{name} ({count})", fill="black")
        x += 110
    pen.text((x, picture.height + 5), f"kept {len(kept)}/{rows * cols}", fill="black")
    return board


def visualise(compiled: CompiledVLM, batch: dict[str, Any], processor=None, index: int = 0):
    """The picture of visual input ``index`` of ``batch`` (images only)."""
    tokens = kept_tokens(compiled, batch)
    image = images_from_pixels(compiled.adapter.model, processor, batch)[index]
    return draw(image, tokens.grids[index], tokens.kept[index], tokens.kinds[index])
