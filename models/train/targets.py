"""What the auxiliary probes and the guides are asked to find, computed from each sample's scene:
per visual token (colour, shape, centre, place, counts, neighbours), per picture (which colours and
shapes it holds), per turn (its evidence objects' visual tokens) and per relative-position answer."""

from __future__ import annotations

import numpy as np
import torch

from vlmopt.reference import scenes, tasks, videos
from vlmopt.reference.render import COLOURS, SHAPES


COORD_SCALE = 1000
"""Grid coordinates are stored in the integer target rows as ``round(COORD_SCALE * index / (side - 1))``."""


COUNT_CLASSES = 5
"""Same-colour / same-shape count classes of :func:`cell_targets`: 0 no object, 1, 2, 3, 4 or more."""


def _token_owner(mask: np.ndarray, objects: int, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """([gh, gw] index of the object covering most of each ``cell`` px cell of ``mask`` [H, W], [gh, gw]
    whether that object covers at least 20% of it) for labels 1..``objects`` (at least one object)."""
    gh, gw = mask.shape[0] // cell, mask.shape[1] // cell
    cells = mask[: gh * cell, : gw * cell].reshape(gh, cell, gw, cell)
    cover = np.stack([(cells == k + 1).mean(axis=(1, 3)) for k in range(objects)])  # [K, gh, gw]
    return cover.argmax(0), cover.max(0) >= 0.2


def cell_targets(sample: tasks.Sample, frame: int, cell: int) -> np.ndarray:
    """[7, gh, gw] int64 per ``cell`` px cell: colour (0 none, 1..6), shape (0 none, 1..6), centre (0/1),
    column and row (0..COORD_SCALE), and how many objects of the frame share the colour, and the shape,
    of the object covering the cell (0 none, else 1..4, 4 meaning 4 or more)."""
    mask = sample.masks[frame]
    objs = sample.objects[frame]
    gh, gw = mask.shape[0] // cell, mask.shape[1] // cell
    out = np.zeros((7, gh, gw), np.int64)
    out[3] = np.round(COORD_SCALE * np.arange(gw) / max(gw - 1, 1))[None, :]
    out[4] = np.round(COORD_SCALE * np.arange(gh) / max(gh - 1, 1))[:, None]
    if not objs:
        return out
    best, hit = _token_owner(mask, len(objs), cell)
    colour = np.array([COLOURS.index(o.colour) + 1 for o in objs])
    shape = np.array([SHAPES.index(o.shape) + 1 for o in objs])
    out[0][hit], out[1][hit] = colour[best][hit], shape[best][hit]
    same_colour = np.minimum((colour[:, None] == colour[None]).sum(1), COUNT_CLASSES - 1)
    same_shape = np.minimum((shape[:, None] == shape[None]).sum(1), COUNT_CLASSES - 1)
    out[5][hit], out[6][hit] = same_colour[best][hit], same_shape[best][hit]
    for o in objs:
        y, x = min(int(o.cy // cell), gh - 1), min(int(o.cx // cell), gw - 1)
        out[2, y, x] = 1
    return out


def aux_targets(samples: list[tasks.Sample], cell: int) -> torch.Tensor:
    """[N, 7] targets (see :func:`cell_targets`), one row per visual token in the model's order (videos:
    per frame pair, the later frame's object labels where it has an object, else the earlier frame's)."""
    rows = []
    for s in samples:
        if not s.is_video:
            rows.append(cell_targets(s, 0, cell).reshape(7, -1).T)
            continue
        T = len(s.objects)
        for t in range(0, T, 2):
            early = cell_targets(s, t, cell)
            late = cell_targets(s, min(t + 1, T - 1), cell)
            merged = np.where(late[0] > 0, late, early)  # object labels (rows 0, 1, 5, 6) from one frame
            merged[2] = np.maximum(early[2], late[2])
            merged[3:5] = early[3:5]
            rows.append(merged.reshape(7, -1).T)
    return torch.from_numpy(np.concatenate(rows))


NEIGHBOUR_ATTRIBUTES = len(COLOURS) + len(SHAPES)
"""Per direction, one yes/no per colour and per shape in :func:`neighbour_targets`."""


def neighbour_targets(samples: list[tasks.Sample], cell: int) -> torch.Tensor:
    """[N, 4 × 12] float, one row per visual token of still pictures (raster order): for the object
    covering the token (as :func:`cell_targets` assigns it), block ``d`` of :data:`scenes.DIRECTIONS`
    marks the colours (first 6) and shapes (last 6) of the objects that are ``d`` of it by
    :func:`scenes.relation`; rows of background tokens are all 0 (the probe skips them)."""
    rows = []
    for s in samples:
        if s.is_video:
            raise ValueError("neighbour_targets: still pictures only")
        objs, mask = s.objects[0], s.masks[0]
        gh, gw = mask.shape[0] // cell, mask.shape[1] // cell
        per_object = np.zeros((len(objs), len(scenes.DIRECTIONS), NEIGHBOUR_ATTRIBUTES), np.float32)
        for k, o in enumerate(objs):
            for other in objs:
                where = scenes.relation(other, o) if other is not o else None
                if where is not None:
                    d = scenes.DIRECTIONS.index(where)
                    per_object[k, d, COLOURS.index(other.colour)] = 1.0
                    per_object[k, d, len(COLOURS) + SHAPES.index(other.shape)] = 1.0
        out = np.zeros((gh * gw, len(scenes.DIRECTIONS) * NEIGHBOUR_ATTRIBUTES), np.float32)
        if objs:
            best, hit = (a.reshape(-1) for a in _token_owner(mask, len(objs), cell))
            out[hit] = per_object.reshape(len(objs), -1)[best[hit]]
        rows.append(out)
    return torch.from_numpy(np.concatenate(rows))


def answer_starts(labels_row: torch.Tensor) -> np.ndarray:
    """Positions of the first token of each labelled answer in one row of ``labels`` [L] (-100 off
    the answers), in turn order; the position before each predicts it."""
    labelled = labels_row.numpy() != -100
    return np.flatnonzero(labelled & ~np.concatenate([[False], labelled[:-1]]))


def relation_targets(labels: torch.Tensor, evidence, grid_w: int) -> tuple[list[int], list[int], torch.Tensor]:
    """(batch rows, query positions, [R, 4] targets) of :attr:`TrainConfig.relation_aux`: for every
    relative-position turn with both objects on screen, the position that predicts its answer and
    the mean grid column and row of each object's tokens (first-named object first), in [-1, 1].
    ``labels`` [B, L] (-100 off the answers), ``evidence`` as :func:`training_turns` returns it,
    ``grid_w`` visual tokens per row."""
    rows, positions, targets = [], [], []
    scale = 2.0 / max(grid_w - 1, 1)
    for row in range(labels.shape[0]):
        for start, (family, groups) in zip(answer_starts(labels[row]), evidence[row]):
            if family != "position" or len(groups) != 2 or not all(len(g) for g in groups):
                continue
            first, other = [((g % grid_w).mean() * scale - 1.0, (g // grid_w).mean() * scale - 1.0) for g in groups]
            rows.append(row), positions.append(int(start) - 1)
            targets.append([*first, *other])
    return rows, positions, torch.tensor(targets, dtype=torch.float32).reshape(-1, 4)


def presence_targets(samples: list[tasks.Sample]) -> torch.Tensor:
    """[B, 12]: which colours and shapes appear in each image."""
    out = torch.zeros(len(samples), len(COLOURS) + len(SHAPES))
    for i, s in enumerate(samples):
        for o in s.objects[0]:
            out[i, COLOURS.index(o.colour)] = 1
            out[i, len(COLOURS) + SHAPES.index(o.shape)] = 1
    return out


def token_cell(model) -> int:
    """Side, in pixels, of the image square one visual token of ``model`` covers: a CLIP patch for
    LLaVA, a 2×2 merge group of patches for Qwen2.5-VL."""
    vision = model.config.vision_config
    return vision.patch_size * getattr(vision, "spatial_merge_size", 1)


def _covered_cells(mask: np.ndarray, label: int, cell: int) -> np.ndarray:
    """Flat raster indices of the ``cell`` px grid cells of ``mask`` [H, W] that ``label`` covers by
    at least 10%."""
    gh, gw = mask.shape[0] // cell, mask.shape[1] // cell
    cells = mask[: gh * cell, : gw * cell].reshape(gh, cell, gw, cell)
    return np.flatnonzero((cells == label).mean(axis=(1, 3)) >= 0.1)


def object_cells(sample: tasks.Sample, object_ids: list[int], cell: int) -> list[np.ndarray]:
    """Per object of ``object_ids``, the flat indices of the ``cell`` px grid cells (the visual tokens,
    raster order) it covers by at least 10%."""
    return [_covered_cells(sample.masks[0], k + 1, cell) for k in object_ids]


def track_tokens(sample: tasks.Sample, track_ids: list[int], cell: int, first_frame: int = 0) -> list[np.ndarray]:
    """Per track of ``track_ids``, the indices of the video's visual tokens it covers from
    ``first_frame`` on. Qwen2.5-VL's video tokens come per temporal patch (frames 2t, 2t+1), each in
    raster order of the ``cell`` px merged grid."""
    per_patch = (sample.masks.shape[1] // cell) * (sample.masks.shape[2] // cell)
    groups = []
    for track in track_ids:
        hits = [
            (t // 2) * per_patch + _covered_cells(sample.masks[t], k + 1, cell)
            for t in range(first_frame, len(sample.objects))
            for k, o in enumerate(sample.objects[t])
            if o.track == track
        ]
        groups.append(np.unique(np.concatenate(hits)) if hits else np.zeros(0, np.int64))
    return groups


def training_turns(
    samples: list[tasks.Sample], k: int, cell: int = 14, balanced: bool = False, weights: dict[str, float] | None = None
) -> tuple[list[list[tuple[str, str]]], list[list[tuple[str, list[np.ndarray]]]]]:
    """Extra (question, answer) turns of each picture or video (the same as
    :meth:`tasks.Sample.more_questions`; ``balanced``, ``weights``: see :func:`scenes.derive`), and for every turn (the sample's own question first) its
    family and the visual tokens of each evidence object (``cell``: a visual token's side, pixels)."""
    turns, evidence = [], []
    for s in samples:
        rng = np.random.default_rng([0, s.index])
        if s.is_video:
            tracks, frames = s.meta["tracks"], s.meta["num_frames"]
            pairs = videos.derive(rng, tracks, frames, k, skip={s.question}, weights=weights) if k else []
            asked = [(s.family, sorted({s.objects[t][j].track for t, j in s.evidence}))]
            asked += [(q.family, videos.oracle(q, tracks, frames)[1]) for q, _ in pairs]
            groups = [(f, track_tokens(s, ids, cell, videos.evidence_start(f, frames))) for f, ids in asked]
        else:
            pairs = scenes.derive(rng, s.objects[0], k, skip={s.question}, balanced=balanced, weights=weights) if k else []
            groups = [(s.family, object_cells(s, [o for _, o in s.evidence], cell))]
            groups += [(q.family, object_cells(s, scenes.oracle(q, s.objects[0])[1], cell)) for q, _ in pairs]
        turns.append([(q.text, a) for q, a in pairs])
        evidence.append(groups)
    return turns, evidence
