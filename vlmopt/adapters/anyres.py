"""Any-resolution images and pooled video frames, as LLaVA-NeXT and LLaVA-OneVision pack them.

HF's ``pack_image_features`` turns each image's tower outputs (the base image, then its best-fit tiles
of ``image_grid_pinpoints``, each ``side × side`` features after the projector) into the LLM's tokens:
the base image's grid, then the tiles joined into one high-resolution grid, unpadded to the image's
aspect ratio (``unpad_image``), resampled by OneVision when it exceeds ``anyres_max_N`` tiles, with the
learned ``image_newline`` after each of its rows. An image of a multi-image OneVision prompt is its
base image and one newline; a OneVision video is each frame's grid pooled 2×2 (bilinear to
``⌈side / 2⌉``), then one newline. :func:`pack_features` repeats those float operations in HF's
order (so the tokens are bit-identical) and returns them in HF's order.

The tokens then flow in **layout order** (:func:`plan_layout`): every input the tower encodes on its
own is a frame of the :class:`~vlmopt.graph.layout.VisualLayout` — the base image, each tile (the part
of it the unpadding keeps), the resampled grid where OneVision resamples (the tiles no longer exist
there), each video (its frames a ``(t, h, w)`` grid) — and the newlines are its structural tokens (a
row's newline belongs to the tile that ends the row; a video's to the video). ``pack_order`` takes the
packed tokens to that order and every token keeps its own sequence slot, so the LLM sees HF's sequence.
``tower_index`` gives each grid token the tower token it comes from (where HF resamples, the one under
its centre), for methods that read the tower's attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from vlmopt.graph.layout import VisualLayout


@dataclass(frozen=True)
class TiledImage:
    """How HF packs one image's tower outputs."""

    patches: int
    """Tower inputs of the image: the base image, then its tiles (1: the base image alone)."""
    tile_grid: tuple[int, int]
    """(rows, columns) of tiles; (0, 0) for the base image alone."""
    crop: tuple[int, int, int, int]
    """(top, bottom, left, right) of the unpadded part of the high-resolution grid, in tokens."""
    resize: tuple[int, int] | None = None
    """(h, w) OneVision resamples the unpadded grid to (``anyres_max_N``), or None."""

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the high-resolution grid the LLM sees (newlines not counted)."""
        top, bottom, left, right = self.crop
        return self.resize or (bottom - top, right - left)

    def tokens(self, side: int) -> int:
        """Features of the image reaching the LLM: base grid, high-resolution grid and its newlines."""
        if self.patches == 1:
            return side * side + 1
        h, w = self.grid
        return side * side + h * (w + 1)


@dataclass(frozen=True)
class PackPlan:
    """Static facts :func:`pack_features` reads: every image's packing and the videos' shape."""

    side: int
    """Tower tokens per tile side (``image_size // patch_size``)."""
    images: tuple[TiledImage, ...]
    videos: int = 0
    """Videos of the batch (OneVision), after the images in the tower's inputs."""
    frames: int = 0
    """Frames of every video (HF stacks a batch's videos)."""
    closing: bool = True
    """Does every video end with its newline? (A stream's chunk does not: the stream writes it with each question.)"""

    @property
    def pooled(self) -> int:
        """Side of a video frame's grid after OneVision's 2×2 pooling."""
        return math.ceil(self.side / 2)

    @property
    def tower_inputs(self) -> int:
        return sum(image.patches for image in self.images) + self.videos * self.frames


def plan_image(size: tuple[int, int], pinpoints, tile: int, side: int, aspect_ratio: str | None, patched: bool) -> TiledImage:
    """The packing of an image of ``size`` (h, w) px: tiles by HF's ``select_best_resolution``, the
    unpadding by HF's own ``unpad_image`` (run on an index grid), OneVision's ``anyres_max_N``
    resampling where ``aspect_ratio`` is given; ``patched=False``: the base image alone."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    if not patched:
        return TiledImage(1, (0, 0), (0, 0, 0, 0))
    size = [int(v) for v in size]
    rows, cols = get_anyres_image_grid_shape(size, pinpoints, tile)
    patches = image_size_to_num_patches(size, pinpoints, tile)
    if patches != rows * cols + 1:
        raise ValueError(f"an image of {size} px has {patches} patches for a {rows}×{cols} tile grid")
    height, width = rows * side, cols * side
    kept = unpad_image(torch.arange(height * width).view(1, height, width), size)
    top, left = divmod(int(kept[0, 0, 0]), width)
    crop = (top, top + kept.shape[1], left, left + kept.shape[2])
    resize = None
    if aspect_ratio is not None:
        limit = int(aspect_ratio.strip("anyres_max_"))
        current_h, current_w = crop[1] - crop[0], crop[3] - crop[2]
        ratio = math.sqrt(current_h * current_w / (limit * side**2))
        if ratio > 1.1:
            resize = (int(current_h // ratio), int(current_w // ratio))
    return TiledImage(patches, (rows, cols), crop, resize)


def tower_pixels(pixel_values: Tensor | None, pixel_values_videos: Tensor | None, plan: PackPlan) -> Tensor:
    """[N, 3, s, s] the tower's inputs: each image's patches (the first ``patches`` of its padded row of
    ``pixel_values`` [I, P, 3, s, s], or a flat [N_img, 3, s, s] as given), then every video frame."""
    parts = []
    if plan.images:
        if pixel_values.dim() == 5:
            parts += [pixel_values[i, : image.patches] for i, image in enumerate(plan.images)]
        else:
            parts.append(pixel_values)
    if plan.videos:
        videos, frames, channels, height, width = pixel_values_videos.shape
        parts.append(pixel_values_videos.view(videos * frames, channels, height, width))
    return torch.cat(parts, dim=0)


def pack_features(projected: Tensor, newline: Tensor, plan: PackPlan) -> Tensor:
    """[T, D] the LLM's visual tokens in HF's order (each image's, then each video's) from the projected
    tower outputs ``projected`` [N, side², D] and ``image_newline`` [D], with HF's float operations."""
    side, parts, offset = plan.side, [], 0
    for image in plan.images:
        feature = projected[offset : offset + image.patches]
        offset += image.patches
        if image.patches == 1:
            parts.append(torch.cat((feature[0], newline[None].to(feature)), dim=0))
            continue
        base, tiles = feature[0], feature[1:]
        rows, cols = image.tile_grid
        grid = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
        top, bottom, left, right = image.crop
        grid = grid[:, top:bottom, left:right]
        if image.resize is not None:
            grid = F.interpolate(grid[None], list(image.resize), mode="bilinear")[0]
        rule = newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.device, grid.dtype)
        grid = torch.cat((grid, rule), dim=-1).flatten(1, 2).transpose(0, 1)
        parts.append(torch.cat((base, grid), dim=0))
    if plan.videos:
        frames = projected[offset:]
        count, _, dim = frames.shape
        pooled = frames.view(count, side, side, -1).permute(0, 3, 1, 2).contiguous()
        pooled = F.interpolate(pooled, size=[plan.pooled, plan.pooled], mode="bilinear")
        pooled = pooled.permute(0, 2, 3, 1).view(count, -1, dim)
        pooled = pooled.reshape(plan.videos, plan.frames * pooled.shape[1], -1)
        if plan.closing:
            rule = newline[None, None, :].repeat(plan.videos, 1, 1).to(pooled.device)
            pooled = torch.cat((pooled, rule), dim=1)
        parts.append(pooled.flatten(0, 1))
    return torch.cat(parts, dim=0)


def _nearest(index: int, out_size: int, in_size: int) -> int:
    """The input cell under the centre of output cell ``index`` when ``in_size`` cells are resampled to ``out_size``."""
    return min(in_size - 1, int((index + 0.5) * in_size / out_size))


@dataclass
class PlannedLayout:
    """What :func:`plan_layout` returns: the graph inputs of the visual tokens' order."""

    layout: VisualLayout
    """Frames (base images, tiles, resampled grids, videos) with their newlines as structural tokens."""
    pack_order: Tensor
    """[T] index of each layout-order token among :func:`pack_features`' HF-order tokens."""
    tower_layout: VisualLayout
    """The tower's inputs as grids (each image's patches, each video's frames), in the tower's order."""
    tower_index: Tensor
    """[T_grid] index of each grid token's tower token, among the tower's grid tokens (CLS left out)."""


def plan_layout(plan: PackPlan, rows: list[int], batch: int, seq_len: int, device: torch.device | None = None) -> PlannedLayout:
    """The layout of a batch whose images, then videos (:func:`pack_features`' order), sit in ``rows``;
    ``pack_order`` and ``tower_index`` on ``device`` (the prompt's inputs')."""
    side, area, pooled = plan.side, plan.side * plan.side, plan.pooled
    inputs, order, tower = [], [], []

    def add(row: int, grid: tuple[int, int, int], cells: list[tuple[int, int]], newlines=None, closing=None) -> None:
        """One frame: ``cells`` (packed index, tower index) in raster order; ``newlines[y]``: the packed
        index of the newline after its grid row ``y``; ``closing``: that of a newline after it all."""
        begin, width, structural = len(order), grid[2], []
        for position, (packed_index, tower_index) in enumerate(cells):
            order.append(packed_index)
            tower.append(tower_index)
            if newlines and position % width == width - 1 and position // width in newlines:
                structural.append(len(order) - begin)
                order.append(newlines[position // width])
        if closing is not None:
            structural.append(len(order) - begin)
            order.append(closing)
        inputs.append((row, grid, tuple(structural)))

    packed = first_patch = 0
    for image, row in zip(plan.images, rows):
        tower0 = first_patch * area
        base = [(packed + i, tower0 + i) for i in range(area)]
        if image.patches == 1:
            add(row, (1, side, side), base, closing=packed + area)
        else:
            add(row, (1, side, side), base)
            top, bottom, left, right = image.crop
            height, width = image.grid
            start = packed + area  # the high-resolution grid: `width` cells, then a newline, per row

            def tower_of(y: int, x: int) -> int:  # (y, x) on the uncropped high-resolution grid
                tile = 1 + (y // side) * image.tile_grid[1] + x // side
                return tower0 + tile * area + (y % side) * side + x % side

            def at(y: int, x: int) -> int:  # (y, x) on the grid the LLM sees
                return start + y * (width + 1) + x

            if image.resize is not None:
                cells = [(at(y, x), tower_of(top + _nearest(y, height, bottom - top), left + _nearest(x, width, right - left)))
                         for y in range(height) for x in range(width)]
                add(row, (1, height, width), cells, {y: at(y, width) for y in range(height)})
            for tile_row in range(image.tile_grid[0] if image.resize is None else 0):
                ys = range(max(top, tile_row * side), min(bottom, (tile_row + 1) * side))
                for tile_col in range(image.tile_grid[1]):
                    xs = range(max(left, tile_col * side), min(right, (tile_col + 1) * side))
                    if not ys or not xs:
                        continue  # the unpadding removed this tile
                    cells = [(at(y - top, x - left), tower_of(y, x)) for y in ys for x in xs]
                    ends_rows = xs[-1] == right - 1  # the tile ending each of its rows holds their newlines
                    add(row, (1, len(ys), len(xs)), cells, {i: at(y - top, width) for i, y in enumerate(ys)} if ends_rows else None)
        packed += image.tokens(side)
        first_patch += image.patches
    for row in rows[len(plan.images):]:
        tower0 = first_patch * area
        cells = [(packed + (f * pooled + y) * pooled + x, tower0 + f * area + _nearest(y, pooled, side) * side + _nearest(x, pooled, side))
                 for f in range(plan.frames) for y in range(pooled) for x in range(pooled)]
        add(row, (plan.frames, pooled, pooled), cells, closing=packed + len(cells) if plan.closing else None)
        packed += len(cells) + int(plan.closing)
        first_patch += plan.frames
    in_rows, grids, structural = zip(*inputs) if inputs else ((), (), ())
    layout = VisualLayout.from_grids(batch, seq_len, in_rows, grids, structural=structural)
    tower_grids = [(image.patches, side, side) for image in plan.images] + [(plan.frames, side, side)] * plan.videos
    tower_layout = VisualLayout.from_grids(batch, seq_len, tuple(rows), tuple(tower_grids))
    return PlannedLayout(layout, torch.tensor(order, dtype=torch.long, device=device), tower_layout,
                         torch.tensor(tower, dtype=torch.long, device=device))
