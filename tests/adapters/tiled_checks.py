"""Checks of the tiled families (LLaVA-NeXT, LLaVA-OneVision): the layout against HF's own packing, the
newlines kept outside every budget, pooling within each tile, HiPrune reading each tile's tower tokens,
HalfV's visual span without newlines. The family modules build the models and batches."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import vlmopt
from tests.conftest import eager_vision_attentions
from vlmopt.adapters.anyres import pack_features
from vlmopt.graph.edit import GraphEditor
from vlmopt.graph.layout import keep_count, pooled_grid
from vlmopt.graph.probe import run_with_probes

NEWLINE = torch.tensor([-1.0, -1.0, -1.0])


def tagged_features(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, side², 3] features naming themselves (tower input, row, column), and [N, side², 3] their place
    (tower input, row, column) on their image's uncropped high-resolution grid (a base image or a video
    frame: its own grid), whose bilinear blends stay places."""
    side, n = plan.side, plan.tower_inputs
    index = torch.arange(n, dtype=torch.float)[:, None].expand(-1, side * side)
    y = torch.arange(side, dtype=torch.float).repeat_interleave(side).expand(n, -1)
    x = torch.arange(side, dtype=torch.float).repeat(side).expand(n, -1)
    tile_row, tile_col, first = torch.zeros(n), torch.zeros(n), 0
    for image in plan.images:
        tiles = torch.arange(image.patches - 1)
        if image.patches > 1:
            tile_row[first + 1 : first + image.patches] = (tiles // image.tile_grid[1]).float()
            tile_col[first + 1 : first + image.patches] = (tiles % image.tile_grid[1]).float()
        first += image.patches
    place = torch.stack([index, y + side * tile_row[:, None], x + side * tile_col[:, None]], dim=-1)
    return torch.stack([index, y, x], dim=-1).contiguous(), place.contiguous()


def hf_packed(model, plan, tags: torch.Tensor, image_sizes: torch.Tensor | None) -> torch.Tensor:
    """HF's own packing of the tagged features (``pack_image_features``; OneVision's ``apply_pooling`` for videos)."""
    inner, parts, offset = model.model, [], 0
    per_image = []
    for image in plan.images:
        per_image.append(tags[offset : offset + image.patches])
        offset += image.patches
    if per_image:
        if "Onevision" in type(model).__name__:
            packed, _ = inner.pack_image_features(per_image, image_sizes, image_newline=NEWLINE,
                                                  vision_aspect_ratio=model.config.vision_aspect_ratio)
        else:
            packed, _ = inner.pack_image_features(per_image, image_sizes, "default", image_newline=NEWLINE)
        parts += packed
    if plan.videos:
        pooled = inner.apply_pooling(tags[offset:]).reshape(plan.videos, -1, 3)
        closing = NEWLINE[None, None].expand(plan.videos, 1, 3) if plan.closing else pooled[:, :0]
        parts.append(torch.cat([pooled, closing], dim=1).flatten(0, 1))
    return torch.cat(parts)


def assert_layout_follows_hf_packing(model, batch) -> None:
    """The layout order of HF's packing: every frame's grid cells in raster order, from one tower input
    (a tile's from that tile, where HF does not resample), HF's newlines exactly at the structural indices,
    and ``tower_index`` naming the tower token each grid token was packed from (where HF resamples, the
    one within a cell of the resampled place)."""
    prompt = vlmopt.compile(model).plan(batch)
    plan, layout = prompt.inputs["tiles"], prompt.layout
    tags, places = tagged_features(plan)
    packed = pack_features(tags, NEWLINE, plan)
    assert torch.equal(packed, hf_packed(model, plan, tags, batch.get("image_sizes"))), "pack_features differs from HF's packing"
    order = prompt.inputs["pack_order"]
    assert sorted(order.tolist()) == list(range(packed.shape[0])), "pack_order is a permutation"
    ordered, placed = packed[order], pack_features(places, NEWLINE, plan)[order]
    tower, offset, grid_offset = prompt.inputs["tower_index"], 0, 0
    for index, (t, h, w) in enumerate(layout.grids):
        tokens = ordered[offset : offset + layout.counts[index]]
        structural, grid = list(layout.structural[index]), layout.grid_indices(index)
        assert (tokens[structural] == NEWLINE).all() and not (tokens[grid] == NEWLINE).all(-1).any()
        cells = tokens[grid].view(t, h, w, 3)
        named = tower[grid_offset : grid_offset + t * h * w]
        if (cells == cells.round()).all():  # not resampled: each cell is one tower token
            assert torch.equal(cells.reshape(-1, 3), tags.reshape(-1, 3)[named])
            assert t > 1 or (cells[..., 0] == cells[0, 0, 0, 0]).all(), "a frame comes from one tower input"
            assert (cells[:, 1:, :, 1] - cells[:, :-1, :, 1] == 1).all() and (cells[:, :, 1:, 2] - cells[:, :, :-1, 2] == 1).all()
        else:  # resampled (OneVision's anyres_max, a video frame's pooling): the nearest tower token
            source = places.reshape(-1, 3)[named]
            frames = source[:, 0].view(t, -1)
            assert (frames == frames[:, :1]).all() or t == 1, "each video frame's tokens come from that frame"
            assert ((placed[offset : offset + layout.counts[index]][grid][:, 1:] - source[:, 1:]).abs() <= 1).all()
        offset, grid_offset = offset + layout.counts[index], grid_offset + t * h * w
    assert offset == layout.total and grid_offset == tower.numel()


def merged(compiled, batch, names=()):
    """(prompt, the merge's tokens [T', D] and slots [T'], probed values of ``names``)."""
    prompt = compiled.plan(batch)
    module = compiled.stages["prefill"]
    editor = GraphEditor(module)
    merge = editor.one("merge")
    tokens, slots = editor.input_of(merge, "features"), editor.input_of(merge, "positions")
    wanted = {tokens.name, slots.name, *names}
    _, values = run_with_probes(module, dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=1), lambda n: n.name in wanted)
    return prompt, values[tokens.name], values[slots.name], values


def newline_slots(prompt) -> torch.Tensor:
    """Sequence slots of the prompt's structural tokens (newlines)."""
    layout, offset, found = prompt.layout, 0, []
    slots = prompt.inputs["visual_positions"][prompt.inputs["pack_order"]]
    for index, count in enumerate(layout.counts):
        found += [offset + i for i in layout.structural[index]]
        offset += count
    return slots[found]


def assert_newlines_kept_outside_the_budget(model, batch, spec: str) -> None:
    """A pruning pass keeps every newline, unchanged and at its slot, on top of each frame's budget
    (``keep_count`` of its grid, or its pooled grid); kept tokens keep their slots and original positions."""
    base, full_tokens, full_slots, _ = merged(vlmopt.compile(model), batch)
    compiled = vlmopt.compile(model, passes=[spec])
    prompt, tokens, slots, values = merged(compiled, batch, {"position_ids_kept", "sequence_index"})
    lines = newline_slots(prompt)
    assert lines.numel() and torch.isin(lines, slots).all(), "every newline reaches the LLM"
    by_slot = dict(zip(full_slots.tolist(), full_tokens))
    for slot in lines.tolist():
        assert torch.equal(tokens[slots.tolist().index(slot)], by_slot[slot]), "a newline is never changed"
    pool = spec.startswith("pool_prune")
    ratio = float(eval(spec.split("keep_ratio=")[1].split(",")[0]))  # noqa: S307 - the tests' own specs
    layout = prompt.layout
    expected = sum(len(s) + (pooled_grid(g, ratio)[1] * pooled_grid(g, ratio)[2] * g[0] if pool else keep_count(c, ratio, None))
                   for s, g, c in zip(layout.structural, layout.grids, layout.grid_counts))
    assert slots.numel() == expected == compiled.visual_tokens_kept(prompt)
    assert torch.isin(slots, full_slots).all()
    index, original = values["sequence_index"], prompt.inputs["position_ids"]
    for row in range(index.shape[0]):
        valid = index[row] >= 0
        assert torch.equal(values["position_ids_kept"][row][valid], original[row][index[row][valid]]), "original positions"


def assert_pooling_stays_within_each_tile(model, batch, keep_ratio: float = 0.25) -> None:
    """PoolPrune's tokens of each frame are the adaptive average of that frame's own grid alone."""
    base_prompt, full_tokens, _, _ = merged(vlmopt.compile(model), batch)
    prompt, tokens, _, _ = merged(vlmopt.compile(model, passes=[f"pool_prune:keep_ratio={keep_ratio}"]), batch)
    layout, offset, out = base_prompt.layout, 0, 0
    for index, (t, h, w) in enumerate(layout.grids):
        grid = full_tokens[offset : offset + layout.counts[index]][layout.grid_indices(index)]
        _, ph, pw = pooled_grid((t, h, w), keep_ratio)
        pooled = F.adaptive_avg_pool2d(grid.view(t, h, w, -1).permute(0, 3, 1, 2), (ph, pw)).permute(0, 2, 3, 1).reshape(-1, grid.shape[-1])
        count = len(layout.structural[index]) + pooled.shape[0]
        torch.testing.assert_close(tokens[out + len(layout.structural[index]) : out + count], pooled)
        offset, out = offset + layout.counts[index], out + count


def assert_hiprune_reads_each_tile(model, batch, block: int = 1) -> None:
    """HiPrune's scores of the grid tokens are the attention HF's eager tower gives the tower token each
    was packed from (per tile and frame, CLS column left out)."""
    compiled = vlmopt.compile(model, passes=[f"hiprune:keep_ratio=1/3,object_layer={block},deep_layer={block}"])
    prompt, _, _, values = merged(compiled, batch, {f"vision_{block}_scores"})
    from vlmopt.adapters.anyres import tower_pixels

    pixels = tower_pixels(prompt.inputs["pixel_values"], prompt.inputs.get("pixel_values_videos"), prompt.inputs["tiles"])
    attention = eager_vision_attentions(model, pixels)[block].mean(dim=(1, 2))
    leading = compiled.adapter.has_cls
    expected = attention[:, leading:].reshape(-1)[prompt.inputs["tower_index"]]
    torch.testing.assert_close(values[f"vision_{block}_scores"], expected, rtol=1e-5, atol=1e-7)


def assert_halfv_span_leaves_newlines_out(model, batch) -> None:
    """HalfV's visual span (what it scores, cuts and freezes) is the visual tokens without the newlines."""
    compiled = vlmopt.compile(model, passes=["halfv"])
    prompt, _, slots, values = merged(compiled, batch, {"visual_span"})
    span = values["visual_span"].reshape(-1)
    expected = torch.zeros_like(span)
    expected[slots[~torch.isin(slots, newline_slots(prompt))]] = True
    assert torch.equal(span, expected)


def assert_export_round_trip(model, processor, tmp_path, passes=("hiprune:keep_ratio=1/3", "halfv")) -> None:
    """Exported with HiPrune and HalfV, onnxruntime answers an image of the export's size with the compiled
    model's tokens; pixel values cut into another number of tiles, or another image size, are refused."""
    import numpy as np
    from PIL import Image

    from vlmopt.errors import InputError
    from vlmopt.export import OnnxVLM, export_onnx
    from vlmopt.export.inputs import encode_prompt, template_of

    manifest = export_onnx(model, tmp_path, passes=list(passes), processor=processor)
    compiled = vlmopt.compile(model, passes=list(passes))
    size = tuple(manifest["layout"]["image_size"])
    picture = Image.fromarray(np.random.default_rng(15).integers(0, 256, (90, 150, 3), dtype=np.uint8))
    arrays = encode_prompt(processor, template_of(compiled.adapter), picture, "what is it?", size)
    batch = {k: torch.from_numpy(v) for k, v in arrays.items()}
    expected = compiled.generate(**batch, max_new_tokens=5)
    vlm = OnnxVLM(tmp_path)
    assert torch.equal(torch.as_tensor(vlm.generate(**arrays, max_new_tokens=5)), expected)
    assert vlm.generate_text(picture, "what is it?", max_new_tokens=3)["token_ids"] == expected[0, -5:-2].tolist()
    wide = encode_prompt(processor, template_of(compiled.adapter), picture, "what is it?", (size[0], 3 * size[1]))
    assert wide["pixel_values"].shape[1] != arrays["pixel_values"].shape[1]
    with pytest.raises(InputError, match=rf"built for {size[1]}×{size[0]} px images \(its tile count"):
        vlm.generate(**wide, max_new_tokens=2)
    fewer_tiles = dict(arrays, pixel_values=arrays["pixel_values"][:, :-1])
    with pytest.raises(InputError, match=f"each cut into {arrays['pixel_values'].shape[1]} tiles"):
        vlm.generate(**fewer_tiles, max_new_tokens=2)
